/*
 * TLS for one STOQ connection: GnuTLS credentials, the session a connection runs, and the
 * certificate checks GnuTLS calls back into during the handshake.
 *
 * Why C: ngtcp2_crypto_gnutls drives the handshake inside GnuTLS, and GnuTLS's verify hook
 * is a C function pointer called with only the session, mid-handshake, on the worker's
 * thread. The trampolines reach the connection through the session pointer and call the
 * Swift peer check (stoq_peer_check_fn) from there.
 */
#define _GNU_SOURCE
#include "stoq_internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <ngtcp2/ngtcp2_crypto_gnutls.h>

/* TLS 1.3 only: the priority string is PRIORITY_HEAD, a cipher list, then PRIORITY_GROUPS. */
#define PRIORITY_HEAD "%DISABLE_TLS13_COMPAT_MODE:NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL"
#define PRIORITY_GROUPS ":-GROUP-ALL:+GROUP-X25519:+GROUP-SECP256R1:+GROUP-SECP384R1:+GROUP-SECP521R1"

/* The TLS 1.3 cipher suites QUIC may use (RFC 9001 §5.3; AES-128-CCM-8 it may not), by their
 * GnuTLS and IANA names, in the order a default endpoint offers them: AES-128-GCM first,
 * the fastest with AES-NI. */
static const struct {
  const char *gnutls, *iana;
  gnutls_cipher_algorithm_t algorithm;
} CIPHERS[] = {
    {"AES-128-GCM", "TLS_AES_128_GCM_SHA256", GNUTLS_CIPHER_AES_128_GCM},
    {"AES-256-GCM", "TLS_AES_256_GCM_SHA384", GNUTLS_CIPHER_AES_256_GCM},
    {"CHACHA20-POLY1305", "TLS_CHACHA20_POLY1305_SHA256", GNUTLS_CIPHER_CHACHA20_POLY1305},
    {"AES-128-CCM", "TLS_AES_128_CCM_SHA256", GNUTLS_CIPHER_AES_128_CCM},
};
#define N_CIPHERS (sizeof(CIPHERS) / sizeof(CIPHERS[0]))
_Static_assert(N_CIPHERS <= sizeof(((stoq_tls_ctx *)0)->suites), "stoq_tls_ctx.suites holds every suite");

static const uint8_t ALPN_H3[] = "h3";

/* ---- Session tickets --------------------------------------------------------- */

/* One ticket key for the whole process, not per credentials or per worker: a ticket issued
 * by one worker resumes on another, and a certificate rotation (new credentials) does not
 * void the tickets clients hold. GnuTLS treats it as a master key: it derives the key that
 * seals tickets from it and the time, afresh every ticket lifetime
 * (gnutls_db_set_cache_expiration), and still opens tickets sealed in the previous period.
 * It lives as long as the process; a restart voids every ticket (the clients then do a full
 * handshake). */
static gnutls_datum_t ticket_key;
static int ticket_key_rv = GNUTLS_E_INTERNAL_ERROR;
static pthread_once_t ticket_key_once = PTHREAD_ONCE_INIT;

/* 0-RTT replay protection (RFC 8446 §8, RFC 9001 §9.2). GnuTLS refuses early data whose
 * ticket age falls outside its window (10 s) and asks `seen_add` about every ClientHello
 * inside it: one that was seen before — a replay, on this worker or another, from any
 * address — gets no 0-RTT (the handshake goes on, 1-RTT). One table for the process, behind a
 * mutex: it is touched once per handshake that offers early data, never per packet, and each
 * touch costs O(1): a hash probe, and the expiry of the oldest entries.
 *
 * The table holds STOQ_ANTI_REPLAY_SLOTS ClientHellos at once, and one /64 (the source's
 * first 64 bits, as the endpoint's other per-client limits count) at most
 * STOQ_ANTI_REPLAY_PER_PREFIX of them: a ticket holder who floods early-data ClientHellos
 * loses its own 0-RTT past that share, not everyone's. Whatever the table cannot remember it
 * refuses 0-RTT (fail closed): a ClientHello over its /64's share, or any once the whole
 * table is live (STOQ_ANTI_REPLAY_SLOTS / STOQ_ANTI_REPLAY_PER_PREFIX /64s flooding at
 * once). A live entry is never dropped early, so a replay inside the window is always seen.
 *
 * Entries sit in a ring in arrival order, which is expiry order (each lives the window on the
 * monotonic clock), so the oldest expire from its head. Two open-addressing tables of twice
 * that size (at most half full) find them: by digest (the ring index), and by /64 (its count).
 * Both hash under a key drawn at start, so a client cannot aim its ClientHellos or addresses
 * at one probe chain. */
#define ANTI_REPLAY_HASH (2 * STOQ_ANTI_REPLAY_SLOTS)
_Static_assert((STOQ_ANTI_REPLAY_SLOTS & (STOQ_ANTI_REPLAY_SLOTS - 1)) == 0, "a power of two");
static struct seen {
  uint8_t digest[16]; /* keyed SHA-256 of the ClientHello's identity, its first half */
  uint64_t prefix;    /* the /64 it came from */
  int64_t expires;    /* CLOCK_MONOTONIC seconds */
} seen_ring[STOQ_ANTI_REPLAY_SLOTS];
static uint32_t seen_head, seen_count;
static uint32_t seen_by_digest[ANTI_REPLAY_HASH]; /* ring index + 1; 0: empty */
static struct {
  uint64_t prefix;
  uint32_t count; /* 0: empty */
} seen_by_prefix[ANTI_REPLAY_HASH];
static uint8_t seen_key[32];
static stoq_anti_replay_stats seen_stats;
static pthread_mutex_t seen_lock = PTHREAD_MUTEX_INITIALIZER;
static gnutls_anti_replay_t anti_replay;

/* GnuTLS 3.7 prefixes each key with the start of its current window (12 bytes: seconds as two
 * 32-bit halves, then nanoseconds) and starts a new window once one has elapsed. A replay that
 * arrives after that rollover, with a ticket age still inside the window, then got a new key
 * and its early data was accepted (test_resumption.py's replay test caught it, now and then).
 * So only the ClientHello's identity after the prefix is kept, and a second longer than GnuTLS
 * asks (its expiry is in whole seconds). */
#define WINDOW_PREFIX 12

static uint32_t slot_of(const uint8_t *h) {
  uint32_t v;
  memcpy(&v, h, sizeof(v));
  return v & (ANTI_REPLAY_HASH - 1);
}

static uint32_t prefix_home(uint64_t prefix) {
  uint8_t h[32];
  gnutls_hmac_fast(GNUTLS_MAC_SHA256, seen_key, sizeof(seen_key), &prefix, sizeof(prefix), h);
  return slot_of(h);
}

/* Whether the occupant of slot j, whose home is k, may move to the emptied slot i (Knuth's
 * deletion for linear probing: it may unless k lies cyclically in (i, j]). */
static int may_move(uint32_t i, uint32_t j, uint32_t k) { return i <= j ? (k <= i || k > j) : (k <= i && k > j); }

static void digest_remove(uint32_t ring_index) {
  uint32_t i = slot_of(seen_ring[ring_index].digest);
  while (seen_by_digest[i] != ring_index + 1) i = (i + 1) & (ANTI_REPLAY_HASH - 1);
  for (uint32_t j = i;;) {
    seen_by_digest[i] = 0;
    for (;;) {
      j = (j + 1) & (ANTI_REPLAY_HASH - 1);
      if (!seen_by_digest[j]) return;
      if (may_move(i, j, slot_of(seen_ring[seen_by_digest[j] - 1].digest))) break;
    }
    seen_by_digest[i] = seen_by_digest[j];
    i = j;
  }
}

/* The /64's slot in seen_by_prefix: where it is, or the empty slot it would take. */
static uint32_t prefix_slot(uint64_t prefix) {
  uint32_t i = prefix_home(prefix);
  while (seen_by_prefix[i].count && seen_by_prefix[i].prefix != prefix) i = (i + 1) & (ANTI_REPLAY_HASH - 1);
  return i;
}

static void prefix_release(uint64_t prefix) {
  uint32_t i = prefix_slot(prefix);
  if (--seen_by_prefix[i].count) return;
  for (uint32_t j = i;;) {
    for (;;) {
      j = (j + 1) & (ANTI_REPLAY_HASH - 1);
      if (!seen_by_prefix[j].count) return;
      if (may_move(i, j, prefix_home(seen_by_prefix[j].prefix))) break;
    }
    seen_by_prefix[i] = seen_by_prefix[j];
    seen_by_prefix[j].count = 0;
    i = j;
  }
}

static int64_t monotonic_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec;
}

/* The table's one entry point: remembers `id` (a ClientHello's identity) from `prefix` for
 * `ttl` seconds. Returns STOQ_ANTI_REPLAY_*. */
static int seen_record(uint64_t prefix, const uint8_t *id, size_t len, int64_t ttl) {
  uint8_t h[32];
  if (gnutls_hmac_fast(GNUTLS_MAC_SHA256, seen_key, sizeof(seen_key), id, len, h) != 0) return STOQ_ANTI_REPLAY_FULL;
  int64_t now = monotonic_seconds();
  int verdict = STOQ_ANTI_REPLAY_NEW;
  pthread_mutex_lock(&seen_lock);
  while (seen_count && seen_ring[seen_head].expires <= now) {
    digest_remove(seen_head);
    prefix_release(seen_ring[seen_head].prefix);
    seen_head = (seen_head + 1) % STOQ_ANTI_REPLAY_SLOTS;
    seen_count--;
  }
  uint32_t i = slot_of(h);
  for (; seen_by_digest[i]; i = (i + 1) & (ANTI_REPLAY_HASH - 1))
    if (memcmp(seen_ring[seen_by_digest[i] - 1].digest, h, 16) == 0) {
      verdict = STOQ_ANTI_REPLAY_SEEN;
      break;
    }
  uint32_t p = prefix_slot(prefix);
  if (verdict == STOQ_ANTI_REPLAY_NEW && seen_count == STOQ_ANTI_REPLAY_SLOTS) verdict = STOQ_ANTI_REPLAY_FULL;
  if (verdict == STOQ_ANTI_REPLAY_NEW && seen_by_prefix[p].count >= STOQ_ANTI_REPLAY_PER_PREFIX)
    verdict = STOQ_ANTI_REPLAY_OVER_SHARE;
  if (verdict == STOQ_ANTI_REPLAY_NEW) {
    uint32_t tail = (seen_head + seen_count) % STOQ_ANTI_REPLAY_SLOTS;
    struct seen *e = &seen_ring[tail];
    memcpy(e->digest, h, sizeof(e->digest));
    e->prefix = prefix;
    e->expires = now + ttl;
    /* Expiry order is ring order: never before the entry ahead of it. */
    if (seen_count) {
      const struct seen *last = &seen_ring[(tail + STOQ_ANTI_REPLAY_SLOTS - 1) % STOQ_ANTI_REPLAY_SLOTS];
      if (e->expires < last->expires) e->expires = last->expires;
    }
    seen_count++;
    seen_by_digest[i] = tail + 1;
    seen_by_prefix[p].prefix = prefix;
    seen_by_prefix[p].count++;
    seen_stats.accepted++;
  } else if (verdict == STOQ_ANTI_REPLAY_SEEN) {
    seen_stats.replays++;
  } else if (verdict == STOQ_ANTI_REPLAY_OVER_SHARE) {
    seen_stats.over_share++;
  } else {
    seen_stats.full++;
  }
  pthread_mutex_unlock(&seen_lock);
  return verdict;
}

static uint64_t prefix64(const struct in6_addr *a) {
  uint64_t p = 0;
  for (int i = 0; i < 8; i++) p = p << 8 | a->s6_addr[i];
  return p;
}

/* GnuTLS's add function: runs inside the handshake, under stoq_conn_read (reading_conn names
 * the connection, so the ClientHello's source). */
static int seen_add(void *ptr, time_t expires, const gnutls_datum_t *key, const gnutls_datum_t *data) {
  (void)ptr;
  (void)data;
  if (key->size <= WINDOW_PREFIX || !reading_conn) return GNUTLS_E_DB_ERROR;
  int64_t ttl = (int64_t)(expires - time(NULL)) + 1;
  if (ttl < 1) ttl = 1;
  switch (seen_record(prefix64(&reading_conn->remote.sin6_addr), key->data + WINDOW_PREFIX, key->size - WINDOW_PREFIX,
                      ttl)) {
  case STOQ_ANTI_REPLAY_NEW:
    return 0;
  case STOQ_ANTI_REPLAY_SEEN:
    return GNUTLS_E_DB_ENTRY_EXISTS;
  default:
    return GNUTLS_E_DB_ERROR;
  }
}

/* GnuTLS's anti-replay window, in seconds (its default: gnutls_anti_replay_set_window is not
 * called); what stoq_anti_replay_record holds an entry for, as seen_add does. */
#define ANTI_REPLAY_WINDOW 10

int stoq_anti_replay_record(const uint8_t source[16], const uint8_t *id, size_t len) {
  if (ticket_key_ready() != 0) return STOQ_ANTI_REPLAY_FULL;
  struct in6_addr a;
  memcpy(&a, source, sizeof(a));
  return seen_record(prefix64(&a), id, len, ANTI_REPLAY_WINDOW + 1);
}

void stoq_anti_replay_stats_get(stoq_anti_replay_stats *out) {
  pthread_mutex_lock(&seen_lock);
  *out = seen_stats;
  out->live = seen_count;
  pthread_mutex_unlock(&seen_lock);
}

static void ticket_key_make(void) {
  ticket_key_rv = gnutls_session_ticket_key_generate(&ticket_key);
  if (ticket_key_rv == 0) ticket_key_rv = gnutls_rnd(GNUTLS_RND_KEY, seen_key, sizeof(seen_key));
  if (ticket_key_rv == 0) ticket_key_rv = gnutls_anti_replay_init(&anti_replay);
  if (ticket_key_rv == 0) gnutls_anti_replay_set_add_function(anti_replay, seen_add);
}

int ticket_key_ready(void) {
  pthread_once(&ticket_key_once, ticket_key_make);
  return ticket_key_rv;
}

void send_session_ticket(stoq_conn *c) {
  if (!c->is_server || !c->ep->s.ticket_lifetime) return;
  /* One ticket per connection: a client that wants more reconnects with one anyway. A failure
   * costs only the next handshake's resumption, so it does not fail this connection. */
  int rv = gnutls_session_ticket_send(c->tls, 1, 0);
  if (rv != 0 && c->ep->s.log) fprintf(stderr, "gnutls_session_ticket_send: %s\n", gnutls_strerror(rv));
}

/* Once a server's handshake is done and its ticket sent, QUIC needs nothing more from the TLS
 * session: packet protection and key updates live in ngtcp2, and a client sends no TLS
 * message after its Finished (RFC 9001 §4.1.3). So the session and what it holds (about 16 KB:
 * the handshake's buffers and the peer's certificates) go, and an idle connection keeps less;
 * what the application still asks of it is kept. CRYPTO data after this ends the connection
 * (cb_recv_crypto_data). A client lets its session go once it kept the server's first
 * ticket (on_ticket), and ignores later ones; from a server that sends none it keeps it. */
void release_tls(stoq_conn *c) {
  c->tls_resumed = gnutls_session_is_resumed(c->tls) != 0;
  c->tls_early = (gnutls_session_get_flags(c->tls) & GNUTLS_SFLAGS_EARLY_DATA) != 0;
  c->tls_cipher = (int)gnutls_cipher_get(c->tls);
  ngtcp2_conn_set_tls_native_handle(c->q, NULL);
  gnutls_deinit(c->tls);
  c->tls = NULL;
}

int stoq_conn_holds_tls(const stoq_conn *c) { return c->tls != NULL; }

int stoq_conn_is_resumed(const stoq_conn *c) {
  return c->tls ? gnutls_session_is_resumed(c->tls) != 0 : c->tls_resumed;
}

int stoq_conn_early_data_accepted(const stoq_conn *c) {
  return c->tls ? (gnutls_session_get_flags(c->tls) & GNUTLS_SFLAGS_EARLY_DATA) != 0 : c->tls_early;
}

const char *stoq_conn_cipher_suite(const stoq_conn *c) {
  if (!c->established) return NULL;
  gnutls_cipher_algorithm_t a = c->tls ? gnutls_cipher_get(c->tls) : (gnutls_cipher_algorithm_t)c->tls_cipher;
  for (size_t i = 0; i < N_CIPHERS; i++)
    if (CIPHERS[i].algorithm == a) return CIPHERS[i].iana;
  return NULL;
}

/* Client: each NewSessionTicket makes the session resumable; keep its blob for the caller's
 * cache. Only the newest is kept (a client resumes with one); once the packet that brought it
 * is read the session is let go (release_tls), so tickets arriving later are not seen. */
static int on_ticket(gnutls_session_t session, unsigned htype, unsigned when, unsigned incoming,
                     const gnutls_datum_t *msg) {
  (void)htype;
  (void)when;
  (void)incoming;
  (void)msg;
  ngtcp2_crypto_conn_ref *ref = gnutls_session_get_ptr(session);
  stoq_conn *c = ref->user_data;
  gnutls_datum_t d = {0};
  if (gnutls_session_get_data2(session, &d) != 0) return 0;
  gnutls_free(c->session.data);
  c->session = d;
  return 0;
}

int stoq_conn_set_session(stoq_conn *c, const uint8_t *data, size_t len) {
  if (c->is_server || !c->tls) return -1;
  if (gnutls_session_set_data(c->tls, data, len) != 0) return -1;
  c->session_offered = 1;
  return 0;
}

size_t stoq_conn_session(const stoq_conn *c, const uint8_t **data) {
  *data = c->session.data;
  return c->session.data ? c->session.size : 0;
}

/* ---- TLS credentials ---------------------------------------------------- */

/* GnuTLS will not sign a TLS 1.3 handshake with a certificate whose keyUsage lacks
 * digitalSignature: it would fail every handshake (a client would silently send no
 * certificate). Say so when the credentials load instead. 0 or -1 (err). */
static int check_signing_usage(stoq_tls_ctx *t, const char *cert_file, char *err, size_t errlen) {
  gnutls_datum_t der = {0};
  gnutls_x509_crt_t crt;
  if (gnutls_certificate_get_crt_raw(t->cred, 0, 0, &der) != 0 || gnutls_x509_crt_init(&crt) != 0) return 0;
  unsigned usage = 0, critical = 0;
  int rv = gnutls_x509_crt_import(crt, &der, GNUTLS_X509_FMT_DER);
  if (rv == 0) rv = gnutls_x509_crt_get_key_usage(crt, &usage, &critical); /* < 0: no keyUsage, anything goes */
  gnutls_x509_crt_deinit(crt);
  if (rv >= 0 && !(usage & GNUTLS_KEY_DIGITAL_SIGNATURE)) {
    set_err(err, errlen, "%s: the certificate's keyUsage lacks digitalSignature, so it cannot sign a TLS 1.3 handshake",
            cert_file);
    return -1;
  }
  return 0;
}

/* GnuTLS says only "Error while reading file." for either of the two: name the one, and why. */
static int load_key_pair(stoq_tls_ctx *t, const char *what, const char *cert_file, const char *key_file, char *err,
                         size_t errlen) {
  const char *files[2] = {cert_file, key_file};
  for (int i = 0; i < 2; i++) {
    FILE *f = fopen(files[i], "r");
    if (!f) {
      set_err(err, errlen, "%s %s %s: %s", what, i ? "key" : "certificate", files[i], strerror(errno));
      return -1;
    }
    fclose(f);
  }
  int rv = gnutls_certificate_set_x509_key_file(t->cred, cert_file, key_file, GNUTLS_X509_FMT_PEM);
  if (rv < 0) {
    set_err(err, errlen, "loading %s certificate %s / key %s: %s", what, cert_file, key_file, gnutls_strerror(rv));
    return -1;
  }
  return check_signing_usage(t, cert_file, err, errlen);
}

stoq_tls_ctx *stoq_tls_server_new(const char *cert_file, const char *key_file, char *err, size_t errlen) {
  stoq_tls_ctx *t = calloc(1, sizeof(*t));
  if (!t) return NULL;
  t->is_server = 1;
  int rv = gnutls_certificate_allocate_credentials(&t->cred);
  if (rv != 0) {
    set_err(err, errlen, "gnutls_certificate_allocate_credentials: %s", gnutls_strerror(rv));
    stoq_tls_free(t);
    return NULL;
  }
  if (load_key_pair(t, "server", cert_file, key_file, err, errlen) != 0) {
    stoq_tls_free(t);
    return NULL;
  }
  return t;
}

stoq_tls_ctx *stoq_tls_client_new(int insecure, char *err, size_t errlen) {
  stoq_tls_ctx *t = calloc(1, sizeof(*t));
  if (!t) return NULL;
  t->insecure = insecure;
  int rv = gnutls_certificate_allocate_credentials(&t->cred);
  if (rv != 0) {
    set_err(err, errlen, "gnutls_certificate_allocate_credentials: %s", gnutls_strerror(rv));
    stoq_tls_free(t);
    return NULL;
  }
  return t;
}

void stoq_tls_server_set_client_auth(stoq_tls_ctx *t, int mode) { t->client_auth = mode; }

int stoq_tls_client_set_certificate(stoq_tls_ctx *t, const char *cert_file, const char *key_file, char *err,
                                    size_t errlen) {
  return load_key_pair(t, "client", cert_file, key_file, err, errlen);
}

void stoq_tls_set_peer_check(stoq_tls_ctx *t, stoq_peer_check_fn fn, void *ctx) {
  t->peer_check = fn;
  t->peer_check_ctx = ctx;
}

void stoq_tls_free(stoq_tls_ctx *t) {
  if (!t) return;
  if (t->cred) gnutls_certificate_free_credentials(t->cred);
  if (t->priority) gnutls_priority_deinit(t->priority);
  free(t);
}

/* Refuses the peer: records why (the connection's error string) and fails the handshake. */
int refuse_peer(stoq_conn *c, const char *why) {
  conn_fail(c, "client certificate refused: %s", why);
  c->peer_refused = 1;
  return GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR;
}

/* Hands the chain the peer sent (DER, leaf first) and the name the client dialled (NULL on
 * the server) to the credentials' policy. 0 = accepted; else `why` holds the policy's reason.
 * No policy registered refuses: C never judges a certificate itself. */
static int run_peer_check(stoq_tls_ctx *t, const gnutls_datum_t *chain, unsigned n, const char *server_name, char *why,
                          size_t whylen) {
  why[0] = 0;
  if (!t->peer_check) {
    snprintf(why, whylen, "no certificate policy is registered");
    return -1;
  }
  const uint8_t **certs = calloc(n, sizeof(*certs));
  size_t *lens = calloc(n, sizeof(*lens));
  int rc = -1;
  if (certs && lens) {
    for (unsigned i = 0; i < n; i++) {
      certs[i] = chain[i].data;
      lens[i] = chain[i].size;
    }
    rc = t->peer_check(t->peer_check_ctx, certs, lens, n, server_name, why, whylen);
  } else {
    snprintf(why, whylen, "out of memory");
  }
  free(certs);
  free(lens);
  if (rc != 0 && !why[0]) snprintf(why, whylen, "refused by the certificate policy");
  return rc;
}

/* Server: mutual TLS. Whether a certificate was presented is a handshake fact; what to make
 * of it is the policy's (chain, dates, keys, usages, revocation, transparency). */
static int verify_client(gnutls_session_t session) {
  ngtcp2_crypto_conn_ref *ref = gnutls_session_get_ptr(session);
  stoq_conn *c = ref->user_data;
  stoq_tls_ctx *t = c->tls_ctx;
  unsigned n = 0;
  const gnutls_datum_t *chain = gnutls_certificate_get_peers(session, &n);
  if (!chain || n == 0) return t->client_auth == STOQ_CLIENT_AUTH_REQUIRED ? refuse_peer(c, "none was presented") : 0;
  char why[sizeof(c->errstr)];
  if (run_peer_check(t, chain, n, NULL, why, sizeof(why)) != 0) return refuse_peer(c, why);
  /* Accepted: `why` now holds what the policy says the client is (roles, key id, subject). */
  snprintf(c->peer_identity, sizeof(c->peer_identity), "%s", why);
  return 0;
}

/* Refuses the server's certificate (client side): the connection's error string says why. */
static int refuse_server(stoq_conn *c, const char *why) {
  conn_fail(c, "TLS handshake failed: peer certificate refused: %s", why);
  c->peer_refused = 1;
  return GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR;
}

/* Client: the server's chain and the name it was dialled by go to the policy. */
static int verify_server(gnutls_session_t session) {
  ngtcp2_crypto_conn_ref *ref = gnutls_session_get_ptr(session);
  stoq_conn *c = ref->user_data;
  unsigned n = 0;
  const gnutls_datum_t *chain = gnutls_certificate_get_peers(session, &n);
  if (!chain || n == 0) return refuse_server(c, "the server presented no certificate");
  char why[sizeof(c->errstr)];
  if (run_peer_check(c->tls_ctx, chain, n, c->verify_name[0] ? c->verify_name : NULL, why, sizeof(why)) != 0)
    return refuse_server(c, why);
  /* Accepted: `why` now holds what the policy says the server is, if it says (a mesh
   * neighbour's node id), or "". */
  snprintf(c->peer_identity, sizeof(c->peer_identity), "%s", why);
  return 0;
}

/* The priority string offering the suites `suites` (indices into CIPHERS, n of them; NULL:
 * all of them, in the table's order) into `out`. At most every suite once: the string fits. */
static void priority_string(const uint8_t *suites, size_t n, char out[static 512]) {
  size_t len = (size_t)snprintf(out, 512, "%s", PRIORITY_HEAD);
  for (size_t i = 0; i < (suites ? n : N_CIPHERS); i++)
    len += (size_t)snprintf(out + len, 512 - len, ":+%s", CIPHERS[suites ? suites[i] : i].gnutls);
  snprintf(out + len, 512 - len, "%s", PRIORITY_GROUPS);
}

size_t stoq_tls_cipher_suite_count(void) { return N_CIPHERS; }

const char *stoq_tls_cipher_suite_name(size_t i, int iana) {
  return i < N_CIPHERS ? (iana ? CIPHERS[i].iana : CIPHERS[i].gnutls) : NULL;
}

const char *stoq_library_version(size_t i, const char **name) {
  switch (i) {
  case 0:
    *name = "ngtcp2";
    return ngtcp2_version(0)->version_str;
  case 1:
    *name = "nghttp3";
    return nghttp3_version(0)->version_str;
  case 2:
    *name = "GnuTLS";
    return gnutls_check_version(NULL);
  default:
    return NULL;
  }
}

/* One priority cache for every session that offers the default suites: gnutls_priority_set_direct
 * parsed the string into a fresh cache (about 8 KB) for each connection and kept it as long as
 * the connection. GnuTLS reference-counts a shared cache; this one lives as long as the process. */
static gnutls_priority_t priority;
static int priority_rv;
static pthread_once_t priority_once = PTHREAD_ONCE_INIT;
static void make_priority(void) {
  char s[512];
  priority_string(NULL, 0, s);
  priority_rv = gnutls_priority_init(&priority, s, NULL);
}

int stoq_tls_set_cipher_suites(stoq_tls_ctx *t, const uint8_t *suites, size_t n, char *err, size_t errlen) {
  if (n == 0 || n > N_CIPHERS) {
    set_err(err, errlen, "cipher suites: %zu of them (1 to %zu)", n, N_CIPHERS);
    return -1;
  }
  unsigned seen = 0;
  for (size_t i = 0; i < n; i++) {
    if (suites[i] >= N_CIPHERS || (seen & (1u << suites[i]))) {
      set_err(err, errlen, "cipher suites: index %u out of range or repeated", (unsigned)suites[i]);
      return -1;
    }
    seen |= 1u << suites[i];
  }
  char s[512];
  priority_string(suites, n, s);
  gnutls_priority_t p;
  int rv = gnutls_priority_init(&p, s, NULL);
  if (rv != 0) {
    set_err(err, errlen, "cipher suites: %s", gnutls_strerror(rv));
    return -1;
  }
  if (t->priority) gnutls_priority_deinit(t->priority);
  t->priority = p;
  memcpy(t->suites, suites, n);
  t->n_suites = (uint8_t)n;
  return 0;
}

size_t stoq_conn_offered_suites(const stoq_conn *c, char *buf, size_t cap) {
  const stoq_tls_ctx *t = c->tls_ctx;
  size_t n = t && t->n_suites ? t->n_suites : N_CIPHERS, len = 0;
  if (cap) buf[0] = 0;
  for (size_t i = 0; i < n && len < cap; i++)
    len +=
        (size_t)snprintf(buf + len, cap - len, "%s%s", i ? ":" : "", CIPHERS[t && t->n_suites ? t->suites[i] : i].iana);
  return len;
}

int setup_tls(stoq_conn *c, const char *server_name) {
  stoq_tls_ctx *t = c->ep->tls;
  /* Under mutual TLS no tickets: a resumed handshake carries no certificate, so the policy
   * (revocation, transparency, a reloaded trust bundle) would not see the client again. */
  int tickets = c->is_server && c->ep->s.ticket_lifetime && t->client_auth == STOQ_CLIENT_AUTH_NONE;
  /* A client offers early data only when it resumes (GnuTLS sends the extension then). */
  int early = (tickets || !c->is_server) && c->ep->s.early_data;
  /* With tickets, the server sends its NewSessionTicket itself once the handshake is
   * complete (send_session_ticket), as QUIC wants it in 1-RTT CRYPTO frames. QUIC has no
   * EndOfEarlyData message (RFC 9001 §8.3). */
  unsigned flags = c->is_server ? GNUTLS_SERVER : GNUTLS_CLIENT;
  if (tickets) flags |= GNUTLS_NO_AUTO_SEND_TICKET;
  if (early) flags |= GNUTLS_ENABLE_EARLY_DATA | GNUTLS_NO_END_OF_EARLY_DATA;
  int rv = gnutls_init(&c->tls, flags);
  if (rv != 0) goto fail;
  if (t->priority) {
    if ((rv = gnutls_priority_set(c->tls, t->priority)) != 0) goto fail;
  } else {
    pthread_once(&priority_once, make_priority);
    if ((rv = priority_rv) != 0 || (rv = gnutls_priority_set(c->tls, priority)) != 0) goto fail;
  }
  if (tickets) {
    if ((rv = ticket_key_ready()) != 0) goto fail;
    if ((rv = gnutls_session_ticket_enable_server(c->tls, &ticket_key)) != 0) goto fail;
    gnutls_db_set_cache_expiration(c->tls, (int)c->ep->s.ticket_lifetime);
  }
  if (early && c->is_server) {
    gnutls_anti_replay_enable(c->tls, anti_replay);
    /* QUIC bounds 0-RTT by its flow control; TLS's limit must be this value (RFC 9001 §4.6.1). */
    gnutls_record_set_max_early_data_size(c->tls, 0xffffffffu);
  }
  rv = c->is_server ? ngtcp2_crypto_gnutls_configure_server_session(c->tls)
                    : ngtcp2_crypto_gnutls_configure_client_session(c->tls);
  if (rv != 0) {
    conn_fail(c, "ngtcp2_crypto_gnutls_configure_session failed");
    return -1;
  }
  c->ref.get_conn = get_conn;
  c->ref.user_data = c;
  gnutls_session_set_ptr(c->tls, &c->ref);
  if ((rv = gnutls_credentials_set(c->tls, GNUTLS_CRD_CERTIFICATE, t->cred)) != 0) goto fail;
  c->tls_ctx = t;
  if (c->is_server && t->client_auth != STOQ_CLIENT_AUTH_NONE) {
    gnutls_certificate_server_set_request(c->tls, t->client_auth == STOQ_CLIENT_AUTH_REQUIRED ? GNUTLS_CERT_REQUIRE
                                                                                              : GNUTLS_CERT_REQUEST);
    /* Name no acceptable CAs: a client then sends the certificate it has (GnuTLS clients send
     * nothing when none matches the list), and the policy refuses it with a reason instead
     * of the client silently staying anonymous. */
    gnutls_certificate_send_x509_rdn_sequence(c->tls, 1);
    gnutls_session_set_verify_function(c->tls, verify_client);
  }
  gnutls_datum_t alpn = {.data = (unsigned char *)(uintptr_t)ALPN_H3, .size = 2};
  gnutls_alpn_set_protocols(c->tls, &alpn, 1,
                            GNUTLS_ALPN_MANDATORY | (c->is_server ? GNUTLS_ALPN_SERVER_PRECEDENCE : 0));
  if (!c->is_server) {
    gnutls_handshake_set_hook_function(c->tls, GNUTLS_HANDSHAKE_NEW_SESSION_TICKET, GNUTLS_HOOK_POST, on_ticket);
    struct in6_addr a6;
    int is_ip = server_name && inet_pton(AF_INET6, server_name, &a6) == 1;
    if (server_name && *server_name && !is_ip)
      gnutls_server_name_set(c->tls, GNUTLS_NAME_DNS, server_name, strlen(server_name));
    /* The policy checks the certificate names what was dialled (a DNS name or an address). */
    if (!t->insecure) {
      snprintf(c->verify_name, sizeof(c->verify_name), "%s", server_name ? server_name : "");
      gnutls_session_set_verify_function(c->tls, verify_server);
    }
  }
  ngtcp2_conn_set_tls_native_handle(c->q, c->tls);
  return 0;
fail:
  conn_fail(c, "TLS setup: %s", gnutls_strerror(rv));
  return -1;
}
