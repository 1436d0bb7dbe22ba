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
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <ngtcp2/ngtcp2_crypto_gnutls.h>

/* TLS 1.3 only; AES-128-GCM first because it is the fastest with AES-NI. */
static const char PRIORITY[] =
    "%DISABLE_TLS13_COMPAT_MODE:NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:"
    "+CHACHA20-POLY1305:+AES-128-CCM:-GROUP-ALL:+GROUP-X25519:+GROUP-SECP256R1:+GROUP-SECP384R1:+GROUP-SECP521R1";

static const uint8_t ALPN_H3[] = "h3";

/* ---- TLS credentials ---------------------------------------------------- */

stoq_tls_ctx *stoq_tls_server_new(const char *cert_file, const char *key_file, char *err, size_t errlen) {
  stoq_tls_ctx *t = calloc(1, sizeof(*t));
  if (!t) return NULL;
  t->is_server = 1;
  int rv = gnutls_certificate_allocate_credentials(&t->cred);
  if (rv == 0) rv = gnutls_certificate_set_x509_key_file(t->cred, cert_file, key_file, GNUTLS_X509_FMT_PEM);
  if (rv != 0) {
    set_err(err, errlen, "loading certificate %s / key %s: %s", cert_file, key_file, gnutls_strerror(rv));
    stoq_tls_free(t);
    return NULL;
  }
  return t;
}

stoq_tls_ctx *stoq_tls_client_new(const char *ca_file, int insecure, char *err, size_t errlen) {
  stoq_tls_ctx *t = calloc(1, sizeof(*t));
  if (!t) return NULL;
  t->insecure = insecure;
  int rv = gnutls_certificate_allocate_credentials(&t->cred);
  if (rv != 0) {
    set_err(err, errlen, "gnutls_certificate_allocate_credentials: %s", gnutls_strerror(rv));
    stoq_tls_free(t);
    return NULL;
  }
  if (ca_file && *ca_file) {
    rv = gnutls_certificate_set_x509_trust_file(t->cred, ca_file, GNUTLS_X509_FMT_PEM);
    if (rv <= 0) {
      set_err(err, errlen, "loading trusted certificates from %s: %s", ca_file,
              rv == 0 ? "no certificate found" : gnutls_strerror(rv));
      stoq_tls_free(t);
      return NULL;
    }
  } else if (!insecure) {
    rv = gnutls_certificate_set_x509_system_trust(t->cred);
    if (rv < 0) {
      set_err(err, errlen, "loading the system trust store: %s", gnutls_strerror(rv));
      stoq_tls_free(t);
      return NULL;
    }
  }
  return t;
}

int stoq_tls_server_set_client_auth(stoq_tls_ctx *t, int mode, const char *const *trust_files, size_t ntrust,
                                    unsigned max_depth, const uint8_t *const *revoked, const size_t *revoked_len,
                                    size_t nrevoked, char *err, size_t errlen) {
  for (size_t i = 0; i < ntrust; i++) {
    int rv = gnutls_certificate_set_x509_trust_file(t->cred, trust_files[i], GNUTLS_X509_FMT_PEM);
    if (rv <= 0) {
      set_err(err, errlen, "loading client-certificate roots from %s: %s", trust_files[i],
              rv == 0 ? "no certificate found" : gnutls_strerror(rv));
      return -1;
    }
  }
  t->revoked = nrevoked ? calloc(nrevoked, sizeof(*t->revoked)) : NULL;
  if (nrevoked && !t->revoked) {
    set_err(err, errlen, "calloc: out of memory");
    return -1;
  }
  for (size_t i = 0; i < nrevoked; i++) {
    size_t n = revoked_len[i] > 20 ? 20 : revoked_len[i];
    memcpy(t->revoked[i] + (20 - n), revoked[i] + (revoked_len[i] - n), n);
  }
  t->nrevoked = nrevoked;
  t->max_depth = max_depth;
  t->client_auth = mode;
  return 0;
}

int stoq_tls_client_set_certificate(stoq_tls_ctx *t, const char *cert_file, const char *key_file, char *err,
                                    size_t errlen) {
  int rv = gnutls_certificate_set_x509_key_file(t->cred, cert_file, key_file, GNUTLS_X509_FMT_PEM);
  if (rv < 0) {
    set_err(err, errlen, "loading client certificate %s / key %s: %s", cert_file, key_file, gnutls_strerror(rv));
    return -1;
  }
  return 0;
}

void stoq_tls_set_peer_check(stoq_tls_ctx *t, stoq_peer_check_fn fn, void *ctx) {
  t->peer_check = fn;
  t->peer_check_ctx = ctx;
}

void stoq_tls_free(stoq_tls_ctx *t) {
  if (!t) return;
  free(t->revoked);
  if (t->cred) gnutls_certificate_free_credentials(t->cred);
  free(t);
}

/* Refuses the peer: records why (the connection's error string) and fails the handshake. */
int refuse_peer(stoq_conn *c, const char *why) {
  conn_fail(c, "client certificate refused: %s", why);
  c->peer_refused = 1;
  return GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR;
}

/* Runs the credentials' peer check on the leaf (chain[0]) and its issuer: chain[1] when the
 * peer sent it, else the issuer GnuTLS found among the trusted certificates. 0 = accepted. */
static int run_peer_check(stoq_tls_ctx *t, const gnutls_datum_t *chain, unsigned n, char *why, size_t whylen) {
  if (!t->peer_check) return 0;
  gnutls_datum_t issuer = {0};
  int owned = 0;
  if (n >= 2) {
    issuer = chain[1];
  } else {
    gnutls_x509_crt_t leaf, iss;
    if (gnutls_x509_crt_init(&leaf) == 0) {
      if (gnutls_x509_crt_import(leaf, &chain[0], GNUTLS_X509_FMT_DER) == 0 &&
          gnutls_certificate_get_issuer(t->cred, leaf, &iss, 0) == 0 &&
          gnutls_x509_crt_export2(iss, GNUTLS_X509_FMT_DER, &issuer) == 0)
        owned = 1;
      gnutls_x509_crt_deinit(leaf);
    }
  }
  why[0] = 0;
  int rc = t->peer_check(t->peer_check_ctx, chain[0].data, chain[0].size, issuer.data, issuer.size, why, whylen);
  if (owned) gnutls_free(issuer.data);
  if (rc != 0 && !why[0]) snprintf(why, whylen, "refused by the peer check");
  return rc;
}

/* Server: mutual TLS. GnuTLS checks the chain against the roots, validity, signatures and
 * constraints, and the key purpose (clientAuth); then depth and the revoked serials. */
static int verify_client(gnutls_session_t session) {
  ngtcp2_crypto_conn_ref *ref = gnutls_session_get_ptr(session);
  stoq_conn *c = ref->user_data;
  stoq_tls_ctx *t = c->tls_ctx;
  unsigned n = 0;
  const gnutls_datum_t *chain = gnutls_certificate_get_peers(session, &n);
  if (!chain || n == 0) return t->client_auth == STOQ_CLIENT_AUTH_REQUIRED ? refuse_peer(c, "none was presented") : 0;
  if (t->max_depth && n > t->max_depth) {
    char why[96];
    snprintf(why, sizeof(why), "chain too long (%u certificates, at most %u)", n, t->max_depth);
    return refuse_peer(c, why);
  }
  gnutls_typed_vdata_st purpose = {.type = GNUTLS_DT_KEY_PURPOSE_OID, .data = (unsigned char *)GNUTLS_KP_TLS_WWW_CLIENT};
  unsigned status = 0;
  int rv = gnutls_certificate_verify_peers(session, &purpose, 1, &status);
  if (rv < 0) return refuse_peer(c, gnutls_strerror(rv));
  if (status) {
    gnutls_datum_t out = {0};
    char why[256] = "not trusted";
    if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) == 0) {
      snprintf(why, sizeof(why), "%s", out.data);
      gnutls_free(out.data);
    }
    return refuse_peer(c, why);
  }
  gnutls_x509_crt_t crt;
  if (gnutls_x509_crt_init(&crt) != 0) return refuse_peer(c, "out of memory");
  if (gnutls_x509_crt_import(crt, &chain[0], GNUTLS_X509_FMT_DER) != 0) {
    gnutls_x509_crt_deinit(crt);
    return refuse_peer(c, "the certificate does not parse");
  }
  /* Key strength: RSA/DSA under 2048 bits or EC under 256 bits is too weak. */
  unsigned bits = 0;
  int pk = gnutls_x509_crt_get_pk_algorithm(crt, &bits);
  int weak = (pk == GNUTLS_PK_RSA || pk == GNUTLS_PK_RSA_PSS || pk == GNUTLS_PK_DSA) ? bits < 2048
             : pk == GNUTLS_PK_ECDSA ? bits < 256 : 0;
  if (weak) {
    char why[96];
    snprintf(why, sizeof(why), "key too weak (%s, %u bits)", gnutls_pk_get_name(pk), bits);
    gnutls_x509_crt_deinit(crt);
    return refuse_peer(c, why);
  }
  uint8_t serial[20] = {0}, padded[20] = {0};
  size_t slen = sizeof(serial);
  if (t->nrevoked && gnutls_x509_crt_get_serial(crt, serial, &slen) == 0 && slen <= 20) {
    memcpy(padded + (20 - slen), serial, slen);
    for (size_t i = 0; i < t->nrevoked; i++) {
      if (memcmp(t->revoked[i], padded, 20) == 0) {
        gnutls_x509_crt_deinit(crt);
        return refuse_peer(c, "the certificate is revoked");
      }
    }
  }
  gnutls_x509_crt_deinit(crt);
  char why[256];
  if (run_peer_check(t, chain, n, why, sizeof(why)) != 0) return refuse_peer(c, why);
  return 0;
}

/* Appends to the NUL-terminated `buf` (of `len` bytes), truncating. */
static void appendf(char *buf, size_t len, const char *fmt, ...) {
  size_t used = strnlen(buf, len);
  if (used + 1 >= len) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf + used, len - used, fmt, ap);
  va_end(ap);
}

/* Appends " (the certificate names DNS:a, IP:b)" (its subject alternative names) to `why`. */
static void append_names(const gnutls_datum_t *der, char *why, size_t whylen) {
  gnutls_x509_crt_t crt;
  if (gnutls_x509_crt_init(&crt) != 0) return;
  if (gnutls_x509_crt_import(crt, der, GNUTLS_X509_FMT_DER) == 0) {
    appendf(why, whylen, " (the certificate names ");
    int any = 0;
    for (unsigned i = 0; i < 64; i++) {
      char buf[256];
      size_t size = sizeof(buf) - 1;
      int type = gnutls_x509_crt_get_subject_alt_name(crt, i, buf, &size, NULL);
      if (type == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE) break;
      if (type == GNUTLS_SAN_DNSNAME) {
        buf[size] = 0;
        appendf(why, whylen, "%sDNS:%s", any ? ", " : "", buf);
      } else if (type == GNUTLS_SAN_IPADDRESS && size == 16) {
        char a[INET6_ADDRSTRLEN];
        inet_ntop(AF_INET6, buf, a, sizeof(a));
        appendf(why, whylen, "%sIP:%s", any ? ", " : "", a);
      } else {
        continue;
      }
      any = 1;
    }
    appendf(why, whylen, "%s)", any ? "" : "nothing");
  }
  gnutls_x509_crt_deinit(crt);
}

/* Refuses the server's certificate (client side): the connection's error string says why. */
static int refuse_server(stoq_conn *c, const char *why) {
  conn_fail(c, "TLS handshake failed: peer certificate refused: %s", why);
  c->peer_refused = 1;
  return GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR;
}

/* Client: the server's chain against the trusted roots, for its name or address and EKU
 * serverAuth (what gnutls_session_set_verify_cert2 does), naming the certificate's names on a
 * mismatch; then the credentials' peer check (certificate transparency). */
static int verify_server(gnutls_session_t session) {
  ngtcp2_crypto_conn_ref *ref = gnutls_session_get_ptr(session);
  stoq_conn *c = ref->user_data;
  unsigned n = 0, status = 0;
  const gnutls_datum_t *chain = gnutls_certificate_get_peers(session, &n);
  if (!chain || n == 0) return refuse_server(c, "the server presented no certificate");
  int rv = gnutls_certificate_verify_peers(session, c->verify_data, 2, &status);
  if (rv < 0) return refuse_server(c, gnutls_strerror(rv));
  char why[512] = "not trusted";
  if (status) {
    gnutls_datum_t out = {0};
    if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) == 0) {
      snprintf(why, sizeof(why), "%s", out.data);
      gnutls_free(out.data);
    }
    if (status & GNUTLS_CERT_UNEXPECTED_OWNER) {
      if (c->verify_data[0].type == GNUTLS_DT_IP_ADDRESS) {
        char a[INET6_ADDRSTRLEN];
        inet_ntop(AF_INET6, c->verify_ip, a, sizeof(a));
        appendf(why, sizeof(why), " SAN mismatch: dialed IP:%s", a);
      } else {
        appendf(why, sizeof(why), " SAN mismatch: dialed DNS:%s", c->verify_name);
      }
      append_names(&chain[0], why, sizeof(why));
    }
    return refuse_server(c, why);
  }
  if (run_peer_check(c->tls_ctx, chain, n, why, sizeof(why)) != 0) return refuse_server(c, why);
  return 0;
}

int setup_tls(stoq_conn *c, const char *server_name) {
  stoq_tls_ctx *t = c->ep->tls;
  int rv = gnutls_init(&c->tls, c->is_server ? GNUTLS_SERVER : GNUTLS_CLIENT);
  if (rv != 0) goto fail;
  if ((rv = gnutls_priority_set_direct(c->tls, PRIORITY, NULL)) != 0) goto fail;
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
    gnutls_certificate_server_set_request(
        c->tls, t->client_auth == STOQ_CLIENT_AUTH_REQUIRED ? GNUTLS_CERT_REQUIRE : GNUTLS_CERT_REQUEST);
    gnutls_session_set_verify_function(c->tls, verify_client);
  }
  gnutls_datum_t alpn = {.data = (unsigned char *)(uintptr_t)ALPN_H3, .size = 2};
  gnutls_alpn_set_protocols(c->tls, &alpn, 1, GNUTLS_ALPN_MANDATORY | (c->is_server ? GNUTLS_ALPN_SERVER_PRECEDENCE : 0));
  if (!c->is_server && server_name && *server_name) {
    struct in6_addr a6;
    int is_ip = inet_pton(AF_INET6, server_name, &a6) == 1;
    if (!is_ip) gnutls_server_name_set(c->tls, GNUTLS_NAME_DNS, server_name, strlen(server_name));
    if (!t->insecure) {
      /* The server's certificate must name it (an IP literal matches an IP SAN; GnuTLS wants
       * the raw bytes for that) and be meant for a TLS server (EKU serverAuth). */
      if (is_ip) {
        memcpy(c->verify_ip, &a6, 16);
        c->verify_data[0].type = GNUTLS_DT_IP_ADDRESS;
        c->verify_data[0].data = c->verify_ip;
        c->verify_data[0].size = 16;
      } else {
        snprintf(c->verify_name, sizeof(c->verify_name), "%s", server_name);
        c->verify_data[0].type = GNUTLS_DT_DNS_HOSTNAME;
        c->verify_data[0].data = (unsigned char *)c->verify_name;
        c->verify_data[0].size = 0;
      }
      c->verify_data[1].type = GNUTLS_DT_KEY_PURPOSE_OID;
      c->verify_data[1].data = (unsigned char *)GNUTLS_KP_TLS_WWW_SERVER;
      c->verify_data[1].size = 0;
      gnutls_session_set_verify_function(c->tls, verify_server);
    }
  }
  ngtcp2_conn_set_tls_native_handle(c->q, c->tls);
  return 0;
fail:
  conn_fail(c, "TLS setup: %s", gnutls_strerror(rv));
  return -1;
}
