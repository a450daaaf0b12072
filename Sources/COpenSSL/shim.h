// OpenSSL 3 as a Clang module (apt: libssl-dev; pkg-config: openssl). Function-like macros that Swift cannot import
// are wrapped as static inline functions here, as CGRPCZlib.h does for zlib.
#ifndef COPENSSL_SHIM_H
#define COPENSSL_SHIM_H
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <openssl/opensslv.h>

static inline const char *copenssl_version_text(void) { return OpenSSL_version(OPENSSL_VERSION); }
static inline long copenssl_set_min_proto_version(SSL_CTX *ctx, int version) {
    return SSL_CTX_set_min_proto_version(ctx, version);
}
static inline long copenssl_set_tlsext_host_name(SSL *ssl, const char *name) {
    return SSL_set_tlsext_host_name(ssl, name);
}
static inline long copenssl_ctx_set_mode(SSL_CTX *ctx, long mode) { return SSL_CTX_set_mode(ctx, mode); }
/* The bytes a memory BIO has allocated for its buffer (BIO_get_mem_ptr is a macro). */
static inline size_t copenssl_bio_mem_capacity(BIO *bio) {
    BUF_MEM *memory = NULL;
    BIO_get_mem_ptr(bio, &memory);
    return memory != NULL ? memory->max : 0;
}
/* Refuses TLS renegotiation in both directions (SSL_OP_NO_RENEGOTIATION is a macro over SSL_OP_BIT). */
static inline void copenssl_ctx_refuse_renegotiation(SSL_CTX *ctx) { SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION); }
static inline int copenssl_ctx_refuses_renegotiation(SSL_CTX *ctx) {
    return (SSL_CTX_get_options(ctx) & SSL_OP_NO_RENEGOTIATION) != 0;
}

/* Private keys are read without a passphrase prompt. OpenSSL's default callback asks on the terminal (or reads
   stdin), which would block a library, or a CLI whose stdin is a pipe; an encrypted key fails to load instead. */
static int copenssl_no_passphrase(char *buf, int size, int rwflag, void *userdata) {
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)userdata;
    return -1;
}
static inline void copenssl_ctx_no_passphrase(SSL_CTX *ctx) { SSL_CTX_set_default_passwd_cb(ctx, copenssl_no_passphrase); }

/* Server side of ALPN: select "h2" or refuse the handshake (a C callback; Swift cannot form a capturing one). */
static int copenssl_alpn_select_h2(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                                   const unsigned char *in, unsigned int inlen, void *arg) {
    (void)ssl;
    (void)arg;
    static const unsigned char h2[] = {2, 'h', '2'};
    if (SSL_select_next_proto((unsigned char **)out, outlen, h2, sizeof(h2), in, inlen) == OPENSSL_NPN_NEGOTIATED) {
        return SSL_TLSEXT_ERR_OK;
    }
    return SSL_TLSEXT_ERR_ALERT_FATAL;
}

static inline void copenssl_ctx_select_h2(SSL_CTX *ctx) { SSL_CTX_set_alpn_select_cb(ctx, copenssl_alpn_select_h2, NULL); }

/* Tests: counts the TLS 1.3 KeyUpdate messages the peer sends into *counter (the message callback sees each
   handshake message once it is decrypted). */
static void copenssl_count_key_update(int write_p, int version, int content_type, const void *buf, size_t len,
                                      SSL *ssl, void *arg) {
    (void)version;
    (void)ssl;
    if (!write_p && content_type == SSL3_RT_HANDSHAKE && len > 0 && ((const unsigned char *)buf)[0] == SSL3_MT_KEY_UPDATE) {
        (*(long *)arg)++;
    }
}
static inline void copenssl_count_peer_key_updates(SSL *ssl, long *counter) {
    SSL_set_msg_callback(ssl, copenssl_count_key_update);
    SSL_set_msg_callback_arg(ssl, counter);
}
#endif
