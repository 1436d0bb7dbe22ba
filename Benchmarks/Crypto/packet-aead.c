/*
 * Packet protection per QUIC packet: the AEAD and the header-protection mask, in GnuTLS (what
 * STOQ uses, called exactly as ngtcp2_crypto_gnutls calls it) against OpenSSL's libcrypto (as
 * ngtcp2_crypto_quictls calls it: EVP, one context per key, re-initialised per packet) and
 * Nettle (GnuTLS's own backend, its low-level API), side by side in one run.
 *
 * Why it exists: crypto is a third of a QUIC endpoint's CPU per GiB (Benchmarks/README.md), and
 * a bulk benchmark (`gnutls-cli --benchmark-ciphers`, `openssl speed`) hides the fixed cost of
 * each call, which a 1,400-byte packet pays a million times a GiB. scripts/bench-crypto builds
 * and runs it; nothing else links it.
 *
 * usage: packet-aead [--json] [--runs N] [--packets N] [--size BYTES]...
 *   --runs     timed runs per case; the median is printed (default 5)
 *   --packets  packets per run (default 200000)
 *   --size     plaintext bytes per packet (default 1200 and 1430: the smallest QUIC packet,
 *              and a full one at max_udp_payload_size 1452); repeatable
 * Before timing, each library opens what the other two sealed and all three must agree on the
 * bytes and the tag: exit 1 and the case named otherwise.
 */
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <nettle/aes.h>
#include <nettle/chacha-poly1305.h>
#include <nettle/chacha.h>
#include <nettle/gcm.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TAG 16
#define NONCE 12
#define AAD 20 /* a short header: flags, an 8-byte DCID, a 4-byte packet number, padding */
#define MAX_SIZE 16384
#define MAX_RUNS 101

enum { GNUTLS, OPENSSL, NETTLE, LIBS };
static const char *lib_names[LIBS] = {"gnutls", "openssl", "nettle"};

enum { AES128GCM, CHACHA20, CIPHERS };
static const char *cipher_names[CIPHERS] = {"AES-128-GCM", "CHACHA20-POLY1305"};

static const uint8_t key[32] = {0x4c, 0x61, 0x6e, 0x67, 0x75, 0x61, 0x67, 0x65, 0x20, 0x69, 0x73,
                                0x20, 0x61, 0x20, 0x76, 0x69, 0x72, 0x75, 0x73, 0x20, 0x66, 0x72,
                                0x6f, 0x6d, 0x20, 0x6f, 0x75, 0x74, 0x65, 0x72, 0x20, 0x73};
static const uint8_t iv[NONCE] = {7, 6, 5, 4, 3, 2, 1, 0, 9, 9, 9, 9};
static uint8_t aad[AAD];

/* One library's keys for one cipher: seal, open, and the header-protection mask. */
typedef struct {
  gnutls_aead_cipher_hd_t g_aead;
  gnutls_cipher_hd_t g_hp;
  EVP_CIPHER_CTX *o_seal, *o_open, *o_hp;
  struct gcm_aes128_ctx n_gcm;
  struct chacha_poly1305_ctx n_cp;
  struct aes128_ctx n_hp;
  struct chacha_ctx n_hp_chacha;
} keys;

static void die(const char *what) {
  fprintf(stderr, "packet-aead: %s\n", what);
  exit(1);
}

static void keys_init(keys *k, int cipher) {
  gnutls_datum_t kd = {(unsigned char *)key, cipher == AES128GCM ? 16 : 32};
  if (gnutls_aead_cipher_init(
          &k->g_aead, cipher == AES128GCM ? GNUTLS_CIPHER_AES_128_GCM : GNUTLS_CIPHER_CHACHA20_POLY1305, &kd) != 0)
    die("gnutls_aead_cipher_init failed");
  /* ngtcp2_crypto_gnutls: AES-CBC with a zero IV set per packet emulates one ECB block;
   * ChaCha20 with the sample as its counter and nonce. */
  uint8_t zero[16] = {0};
  gnutls_datum_t ivd = {zero, 16};
  if (gnutls_cipher_init(&k->g_hp, cipher == AES128GCM ? GNUTLS_CIPHER_AES_128_CBC : GNUTLS_CIPHER_CHACHA20_32, &kd,
                         &ivd) != 0)
    die("gnutls_cipher_init failed");

  const EVP_CIPHER *aead = cipher == AES128GCM ? EVP_aes_128_gcm() : EVP_chacha20_poly1305();
  k->o_seal = EVP_CIPHER_CTX_new();
  k->o_open = EVP_CIPHER_CTX_new();
  k->o_hp = EVP_CIPHER_CTX_new();
  if (!k->o_seal || !k->o_open || !k->o_hp || EVP_EncryptInit_ex(k->o_seal, aead, NULL, key, NULL) != 1 ||
      EVP_DecryptInit_ex(k->o_open, aead, NULL, key, NULL) != 1 ||
      EVP_EncryptInit_ex(k->o_hp, cipher == AES128GCM ? EVP_aes_128_ecb() : EVP_chacha20(), NULL, key, NULL) != 1)
    die("OpenSSL EVP init failed");

  if (cipher == AES128GCM) {
    gcm_aes128_set_key(&k->n_gcm, key);
    aes128_set_encrypt_key(&k->n_hp, key);
  } else {
    chacha_poly1305_set_key(&k->n_cp, key);
    chacha_set_key(&k->n_hp_chacha, key);
  }
}

static void keys_free(keys *k) {
  gnutls_aead_cipher_deinit(k->g_aead);
  gnutls_cipher_deinit(k->g_hp);
  EVP_CIPHER_CTX_free(k->o_seal);
  EVP_CIPHER_CTX_free(k->o_open);
  EVP_CIPHER_CTX_free(k->o_hp);
}

/* Seals `len` bytes of `pt` into `out` (ciphertext, then the tag). 0 on success. */
static int seal(keys *k, int lib, int cipher, const uint8_t *nonce, const uint8_t *pt, size_t len, uint8_t *out) {
  switch (lib) {
  case GNUTLS: {
    size_t outlen = len + TAG;
    return gnutls_aead_cipher_encrypt(k->g_aead, nonce, NONCE, aad, AAD, TAG, pt, len, out, &outlen);
  }
  case OPENSSL: {
    int n;
    if (EVP_EncryptInit_ex(k->o_seal, NULL, NULL, NULL, nonce) != 1 ||
        EVP_EncryptUpdate(k->o_seal, NULL, &n, aad, AAD) != 1 ||
        EVP_EncryptUpdate(k->o_seal, out, &n, pt, (int)len) != 1 || EVP_EncryptFinal_ex(k->o_seal, out + n, &n) != 1 ||
        EVP_CIPHER_CTX_ctrl(k->o_seal, EVP_CTRL_AEAD_GET_TAG, TAG, out + len) != 1)
      return -1;
    return 0;
  }
  default:
    if (cipher == AES128GCM) {
      gcm_aes128_set_iv(&k->n_gcm, NONCE, nonce);
      gcm_aes128_update(&k->n_gcm, AAD, aad);
      gcm_aes128_encrypt(&k->n_gcm, len, out, pt);
      gcm_aes128_digest(&k->n_gcm, TAG, out + len);
    } else {
      chacha_poly1305_set_nonce(&k->n_cp, nonce);
      chacha_poly1305_update(&k->n_cp, AAD, aad);
      chacha_poly1305_encrypt(&k->n_cp, len, out, pt);
      chacha_poly1305_digest(&k->n_cp, TAG, out + len);
    }
    return 0;
  }
}

/* Opens `len` bytes of ciphertext followed by its tag into `out`. 0 when the tag verifies. */
static int open_(keys *k, int lib, int cipher, const uint8_t *nonce, const uint8_t *ct, size_t len, uint8_t *out) {
  switch (lib) {
  case GNUTLS: {
    size_t outlen = len;
    return gnutls_aead_cipher_decrypt(k->g_aead, nonce, NONCE, aad, AAD, TAG, ct, len + TAG, out, &outlen);
  }
  case OPENSSL: {
    int n;
    if (EVP_DecryptInit_ex(k->o_open, NULL, NULL, NULL, nonce) != 1 ||
        EVP_DecryptUpdate(k->o_open, NULL, &n, aad, AAD) != 1 ||
        EVP_DecryptUpdate(k->o_open, out, &n, ct, (int)len) != 1 ||
        EVP_CIPHER_CTX_ctrl(k->o_open, EVP_CTRL_AEAD_SET_TAG, TAG, (void *)(ct + len)) != 1 ||
        EVP_DecryptFinal_ex(k->o_open, out + n, &n) != 1)
      return -1;
    return 0;
  }
  default: {
    uint8_t tag[TAG];
    if (cipher == AES128GCM) {
      gcm_aes128_set_iv(&k->n_gcm, NONCE, nonce);
      gcm_aes128_update(&k->n_gcm, AAD, aad);
      gcm_aes128_decrypt(&k->n_gcm, len, out, ct);
      gcm_aes128_digest(&k->n_gcm, TAG, tag);
    } else {
      chacha_poly1305_set_nonce(&k->n_cp, nonce);
      chacha_poly1305_update(&k->n_cp, AAD, aad);
      chacha_poly1305_decrypt(&k->n_cp, len, out, ct);
      chacha_poly1305_digest(&k->n_cp, TAG, tag);
    }
    return memcmp(tag, ct + len, TAG) == 0 ? 0 : -1;
  }
  }
}

/* The header-protection mask of one 16-byte sample (the first 5 bytes are used). */
static int hp_mask(keys *k, int lib, int cipher, const uint8_t *sample, uint8_t mask[16]) {
  static const uint8_t zero[16] = {0};
  switch (lib) {
  case GNUTLS:
    if (cipher == AES128GCM) {
      gnutls_cipher_set_iv(k->g_hp, (void *)zero, 16);
      return gnutls_cipher_encrypt2(k->g_hp, sample, 16, mask, 16);
    }
    gnutls_cipher_set_iv(k->g_hp, (void *)sample, 16);
    return gnutls_cipher_encrypt2(k->g_hp, zero, 5, mask, 16);
  case OPENSSL: {
    int n;
    if (cipher == AES128GCM) return EVP_EncryptUpdate(k->o_hp, mask, &n, sample, 16) == 1 ? 0 : -1;
    if (EVP_EncryptInit_ex(k->o_hp, NULL, NULL, NULL, sample) != 1) return -1;
    return EVP_EncryptUpdate(k->o_hp, mask, &n, zero, 5) == 1 ? 0 : -1;
  }
  default:
    if (cipher == AES128GCM) {
      aes128_encrypt(&k->n_hp, 16, mask, sample);
    } else {
      /* The sample is a 4-byte little-endian block counter, then a 12-byte nonce. */
      chacha_set_nonce96(&k->n_hp_chacha, sample + 4);
      chacha_set_counter32(&k->n_hp_chacha, sample);
      chacha_crypt32(&k->n_hp_chacha, 5, mask, zero);
    }
    return 0;
  }
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static uint8_t pt[MAX_SIZE], ct[LIBS][MAX_SIZE + TAG], out[MAX_SIZE + TAG];

/* Each library opens what every library sealed, and all seal and mask alike. */
static void cross_check(keys k[LIBS], int cipher, size_t len) {
  uint8_t masks[LIBS][16];
  for (int l = 0; l < LIBS; l++) {
    if (seal(&k[l], l, cipher, iv, pt, len, ct[l]) != 0) die("seal failed");
    if (hp_mask(&k[l], l, cipher, ct[l], masks[l]) != 0) die("header protection failed");
  }
  for (int l = 0; l < LIBS; l++) {
    char what[160];
    snprintf(what, sizeof what, "%s, %zu bytes: %s", cipher_names[cipher], len, lib_names[l]);
    if (memcmp(ct[l], ct[GNUTLS], len + TAG) != 0) die(strcat(what, " sealed other bytes than gnutls"));
    if (memcmp(masks[l], masks[GNUTLS], 5) != 0) die(strcat(what, " masked a header otherwise than gnutls"));
    for (int m = 0; m < LIBS; m++) {
      memset(out, 0, len);
      if (open_(&k[l], l, cipher, iv, ct[m], len, out) != 0 || memcmp(out, pt, len) != 0)
        die(strcat(what, " could not open another library's packet"));
    }
  }
}

enum { SEAL, OPEN, MASK, OPS };
static const char *op_names[OPS] = {"seal", "open", "hp_mask"};

/* Nanoseconds per packet, the median of `runs`. */
static double time_op(keys *k, int lib, int cipher, int op, size_t len, long packets, int runs) {
  double samples[MAX_RUNS];
  uint8_t nonce[NONCE], mask[16];
  memcpy(nonce, iv, NONCE);
  for (int r = 0; r < runs; r++) {
    double t = now();
    for (long i = 0; i < packets; i++) {
      int rv;
      switch (op) {
      case SEAL:
        nonce[NONCE - 1] = (uint8_t)i; /* a fresh nonce per packet, as the packet number makes one */
        rv = seal(k, lib, cipher, nonce, pt, len, out);
        break;
      case OPEN:
        rv = open_(k, lib, cipher, iv, ct[GNUTLS], len, out);
        break;
      default:
        rv = hp_mask(k, lib, cipher, ct[GNUTLS] + (i & 63), mask);
      }
      if (rv != 0) die("a timed call failed");
    }
    samples[r] = (now() - t) / (double)packets * 1e9;
  }
  qsort(samples, (size_t)runs, sizeof samples[0], cmp_double);
  return samples[runs / 2];
}

int main(int argc, char **argv) {
  int json = 0, runs = 5, nsizes = 0;
  long packets = 200000;
  size_t sizes[8];
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--json") == 0) {
      json = 1;
    } else if (strcmp(argv[i], "--runs") == 0 && i + 1 < argc) {
      runs = atoi(argv[++i]);
    } else if (strcmp(argv[i], "--packets") == 0 && i + 1 < argc) {
      packets = atol(argv[++i]);
    } else if (strcmp(argv[i], "--size") == 0 && i + 1 < argc && nsizes < 8) {
      sizes[nsizes++] = (size_t)atol(argv[++i]);
    } else {
      fprintf(stderr, "usage: packet-aead [--json] [--runs N] [--packets N] [--size BYTES]...\n");
      return 2;
    }
  }
  if (nsizes == 0) {
    sizes[nsizes++] = 1200;
    sizes[nsizes++] = 1430;
  }
  if (runs < 1 || runs > MAX_RUNS || packets < 1) die("--runs must be 1 … 101 and --packets at least 1");
  for (int s = 0; s < nsizes; s++)
    if (sizes[s] < 16 || sizes[s] > MAX_SIZE) die("--size must be 16 … 16384 bytes");
  for (size_t i = 0; i < sizeof pt; i++) pt[i] = (uint8_t)(i * 131 + 7);
  for (size_t i = 0; i < AAD; i++) aad[i] = (uint8_t)(0xc0 + i);

  if (json) printf("{\"runs\": %d, \"packets\": %ld, \"cases\": [", runs, packets);
  else
    printf("%-18s %5s %-8s %9s %9s %9s %9s %9s\n", "cipher", "bytes", "op", "gnutls", "openssl", "nettle", "ossl/gtls",
           "ntl/gtls");
  int first = 1;
  for (int c = 0; c < CIPHERS; c++) {
    keys k[LIBS];
    for (int l = 0; l < LIBS; l++) keys_init(&k[l], c);
    for (int s = 0; s < nsizes; s++) {
      cross_check(k, c, sizes[s]);
      for (int op = 0; op < OPS; op++) {
        if (op == MASK && s > 0) continue; /* the mask does not depend on the packet's size */
        double ns[LIBS];
        for (int l = 0; l < LIBS; l++) ns[l] = time_op(&k[l], l, c, op, sizes[s], packets, runs);
        if (json) {
          printf("%s\n {\"cipher\": \"%s\", \"bytes\": %zu, \"op\": \"%s\", \"ns_per_packet\": {\"gnutls\": %.1f, "
                 "\"openssl\": %.1f, \"nettle\": %.1f}, \"openssl_over_gnutls\": %.3f, \"nettle_over_gnutls\": %.3f}",
                 first ? "" : ",", cipher_names[c], op == MASK ? (size_t)16 : sizes[s], op_names[op], ns[GNUTLS],
                 ns[OPENSSL], ns[NETTLE], ns[OPENSSL] / ns[GNUTLS], ns[NETTLE] / ns[GNUTLS]);
        } else {
          printf("%-18s %5zu %-8s %7.0fns %7.0fns %7.0fns %8.2fx %8.2fx\n", cipher_names[c],
                 op == MASK ? (size_t)16 : sizes[s], op_names[op], ns[GNUTLS], ns[OPENSSL], ns[NETTLE],
                 ns[OPENSSL] / ns[GNUTLS], ns[NETTLE] / ns[GNUTLS]);
        }
        first = 0;
      }
    }
    for (int l = 0; l < LIBS; l++) keys_free(&k[l]);
  }
  if (json) printf("\n]}\n");
  return 0;
}
