# AES-GCM through intel-ipsec-mb when the core is built with it (gcm_mb.h says why);
# every function reports "unavailable" otherwise and the EVP path is used.
from libc.stdint cimport uint8_t


cdef extern from "gcm_mb.h" nogil:
    int GCM_MB_JOINED_AAD
    int gcm_mb_start()
    int gcm_mb_compiled()
    const char* gcm_mb_version()
    const char* gcm_mb_arch_name()
    int gcm_mb_set_active(int active)
    int gcm_mb_is_active()
    void* gcm_mb_key_new(const uint8_t* key, int key_len)
    void gcm_mb_key_free(void* expanded)
    int gcm_mb_seal(const void* expanded, int key_len, const uint8_t* iv,
                    const uint8_t* aad, int aad_len,
                    const uint8_t* aad_tail, int aad_tail_len,
                    uint8_t* data, int length, uint8_t* tag)
    int gcm_mb_open(const void* expanded, int key_len, const uint8_t* iv,
                    const uint8_t* aad, int aad_len,
                    const uint8_t* aad_tail, int aad_tail_len,
                    uint8_t* data, int length, const uint8_t* tag)
