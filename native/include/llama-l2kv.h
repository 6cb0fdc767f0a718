// llama-l2kv.h - public C API of l2kv-cpp, an L2-norm KV cache eviction extension for llama.cpp
//
// Keys with a low L2 norm draw high attention, so past a budget the cache keeps the lowest-norm keys
// (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
// EMNLP 2024, arXiv:2406.11430).
//
// This header is compiled into libllama by the l2kv-cpp patch series (see patches/README.md in the
// l2kv-cpp repository). The Python binding parses the declarations between the L2KV_CDEF markers
// below with cffi, so keep that region plain C: no macros other than LLAMA_API, no preprocessor
// lines, no inline functions.
//
// Versioning: LLAMA_L2KV_ABI_VERSION is bumped whenever a struct layout or a function signature in
// this header changes. Callers compare llama_l2kv_abi_version() with the value they were built
// against before calling anything else.

#ifndef LLAMA_L2KV_H
#define LLAMA_L2KV_H

#include "llama.h"

#include <stdbool.h>
#include <stdint.h>

#define LLAMA_L2KV_ABI_VERSION 1

#ifdef __cplusplus
extern "C" {
#endif

// L2KV_CDEF_BEGIN

    // status codes returned by the l2kv functions; 0 is success, errors are negative
    enum llama_l2kv_status {
        LLAMA_L2KV_STATUS_OK                 =  0,
        LLAMA_L2KV_STATUS_INVALID_ARGUMENT   = -1, // a NULL pointer or an out-of-range value
        LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY = -2, // the context has no KV cache the scheme can serve
    };

    // ABI version of the library (LLAMA_L2KV_ABI_VERSION at build time)
    // call this first: a library without this symbol is a stock llama.cpp
    LLAMA_API int32_t llama_l2kv_abi_version(void);

    // human-readable build description, e.g. "l2kv-cpp abi 1, llama.cpp 0c1e5709"
    // the returned string is static and must not be freed
    LLAMA_API const char * llama_l2kv_build_info(void);

    // short name of a status code, e.g. "invalid argument"; never NULL
    LLAMA_API const char * llama_l2kv_status_str(int32_t status);

    // whether flash attention is enabled on the context after llama.cpp resolved
    // LLAMA_FLASH_ATTN_TYPE_AUTO (the value the graphs are built with)
    // writes the answer to *out and returns a status
    LLAMA_API int32_t llama_l2kv_get_flash_attn(const struct llama_context * ctx, bool * out);

// L2KV_CDEF_END

#ifdef __cplusplus
}
#endif

#endif // LLAMA_L2KV_H
