# OpenSSL libcrypto declarations used by the SRTP half of the compiled core
# (whepfan/_srtp.pxi). Linked with -lcrypto (setup.py).

cdef extern from "openssl/crypto.h" nogil:
    # Constant-time comparison, 0 iff equal: a tag check that leaked how many leading
    # bytes matched would let a forger find a valid tag byte by byte.
    int CRYPTO_memcmp(const void* a, const void* b, size_t length)
    void OPENSSL_cleanse(void* ptr, size_t length)

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_CIPHER:
        pass
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct ENGINE:
        pass

    const EVP_CIPHER* EVP_aes_128_ctr()
    const EVP_CIPHER* EVP_aes_256_ctr()
    const EVP_CIPHER* EVP_aes_128_gcm()
    const EVP_CIPHER* EVP_aes_256_gcm()

    EVP_CIPHER_CTX* EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX* ctx)
    int EVP_CipherInit_ex(EVP_CIPHER_CTX* ctx, const EVP_CIPHER* cipher, ENGINE* impl,
                          const unsigned char* key, const unsigned char* iv, int enc)
    int EVP_CipherUpdate(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl,
                         const unsigned char* inp, int inl)
    int EVP_CipherFinal_ex(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX* ctx, int type, int arg, void* ptr)

    int EVP_CTRL_GCM_SET_IVLEN
    int EVP_CTRL_GCM_GET_TAG
    int EVP_CTRL_GCM_SET_TAG

cdef extern from "openssl/sha.h" nogil:
    # The low-level SHA-1 API is deprecated in OpenSSL 3.0 but still built by every
    # distribution; it is the one way to keep a precomputed HMAC inner/outer state as
    # a plain struct (copied by value per packet: no allocation). The EVP_MAC and
    # HMAC_CTX re-init paths duplicate provider contexts with malloc on every packet
    # in 3.0 and measured ~10 % slower (0.65-0.67 vs 0.58 us per 1200 bytes).
    ctypedef struct SHA_CTX:
        pass
    int SHA1_Init(SHA_CTX* c)
    int SHA1_Update(SHA_CTX* c, const void* data, size_t length)
    int SHA1_Final(unsigned char* md, SHA_CTX* c)
