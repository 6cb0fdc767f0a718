// llama-l2kv.cpp - the l2kv-cpp C API (see include/llama-l2kv.h)
//
// Compiled into libllama by native/l2kv.cmake, which the l2kv-cpp patch series includes from
// src/CMakeLists.txt. Lives beside the upstream sources so it can use llama.cpp internals.

#include "llama-l2kv.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-version.h"

// set by native/l2kv.cmake from the build script: a hash of patches/ + native/
#ifndef LLAMA_L2KV_SOURCE_HASH
#define LLAMA_L2KV_SOURCE_HASH "unknown"
#endif

#define LLAMA_L2KV_STR_(x) #x
#define LLAMA_L2KV_STR(x)  LLAMA_L2KV_STR_(x)

int32_t llama_l2kv_abi_version(void) {
    return LLAMA_L2KV_ABI_VERSION;
}

const char * llama_l2kv_build_info(void) {
    return "l2kv-cpp abi " LLAMA_L2KV_STR(LLAMA_L2KV_ABI_VERSION)
           "; llama.cpp " LLAMA_COMMIT
           "; source " LLAMA_L2KV_SOURCE_HASH;
}

const char * llama_l2kv_status_str(int32_t status) {
    switch (status) {
        case LLAMA_L2KV_STATUS_OK:                 return "ok";
        case LLAMA_L2KV_STATUS_INVALID_ARGUMENT:   return "invalid argument";
        case LLAMA_L2KV_STATUS_UNSUPPORTED_MEMORY: return "unsupported memory";
        default:                                   return "unknown status";
    }
}

int32_t llama_l2kv_get_flash_attn(const struct llama_context * ctx, bool * out) {
    if (ctx == nullptr || out == nullptr) {
        LLAMA_LOG_ERROR("%s: ctx (%p) and out (%p) must not be NULL\n", __func__, (const void *) ctx, (const void *) out);
        return LLAMA_L2KV_STATUS_INVALID_ARGUMENT;
    }
    *out = ctx->get_cparams().flash_attn;
    return LLAMA_L2KV_STATUS_OK;
}
