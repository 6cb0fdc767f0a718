# l2kv.cmake - compiles l2kv-cpp's own sources into the llama target.
#
# Included from src/CMakeLists.txt by patches/0001-build-compile-l2kv-sources.patch; the build
# script copies native/ of the l2kv-cpp repository to <llama.cpp>/l2kv/ before configuring.

set(LLAMA_L2KV_DIR ${CMAKE_CURRENT_LIST_DIR})

set(LLAMA_L2KV_SOURCES
    ${LLAMA_L2KV_DIR}/src/llama-l2kv.cpp
    ${LLAMA_L2KV_DIR}/src/llama-kv-cache-l2.cpp
    ${LLAMA_L2KV_DIR}/src/llama-l2kv-probe.cpp
    ${LLAMA_L2KV_DIR}/src/llama-l2kv-scorer.cpp
    ${LLAMA_L2KV_DIR}/src/llama-l2kv-archive.cpp
    ${LLAMA_L2KV_DIR}/src/llama-l2kv-recall.cpp
    ${LLAMA_L2KV_DIR}/src/llama-l2kv-positions.cpp
)

target_sources(llama PRIVATE ${LLAMA_L2KV_SOURCES} ${LLAMA_L2KV_DIR}/include/llama-l2kv.h)

# like the other core sources: not part of the unity build
set_source_files_properties(${LLAMA_L2KV_SOURCES} PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)

target_include_directories(llama PUBLIC $<BUILD_INTERFACE:${LLAMA_L2KV_DIR}/include>)
# llama-kv-cache.cpp includes llama-kv-cache-l2.h through the hooks of the patch series
target_include_directories(llama PRIVATE ${LLAMA_L2KV_DIR}/src)

# the host part of an eviction runs on the CPU backend's OpenMP threads when ggml uses OpenMP: threads
# of our own would compete with OpenMP's, which keep spinning for milliseconds after each graph
if (GGML_OPENMP_ENABLED)
    if (TARGET ggml-openmp-cxx)
        target_link_libraries(llama PRIVATE ggml-openmp-cxx)
    else()
        find_package(OpenMP COMPONENTS CXX)
    endif()
    if (TARGET ggml-openmp-cxx OR OpenMP_CXX_FOUND)
        if (OpenMP_CXX_FOUND)
            target_link_libraries(llama PRIVATE OpenMP::OpenMP_CXX)
        endif()
        set_property(SOURCE ${LLAMA_L2KV_DIR}/src/llama-kv-cache-l2.cpp APPEND PROPERTY
            COMPILE_DEFINITIONS LLAMA_L2KV_USE_OPENMP)
    endif()
endif()

# lets llama_l2kv_build_info() name the exact patch series the library was built from
set(LLAMA_L2KV_SOURCE_HASH "unknown" CACHE STRING "l2kv-cpp: hash of patches/ and native/")
# (set on the one file that uses it, so a new hash does not recompile all of libllama)
set_property(SOURCE ${LLAMA_L2KV_DIR}/src/llama-l2kv.cpp APPEND PROPERTY
    COMPILE_DEFINITIONS LLAMA_L2KV_SOURCE_HASH="${LLAMA_L2KV_SOURCE_HASH}")

# with the RPC backend (GGML_RPC=ON): llama.cpp's rpc-server (tools/rpc, left out by LLAMA_BUILD_TOOLS=OFF) as
# l2kv-rpc-server, installed beside the wheel's libraries so that it always runs on exactly this ggml
if (GGML_RPC)
    add_executable(l2kv-rpc-server ${LLAMA_L2KV_DIR}/../tools/rpc/rpc-server.cpp)
    target_link_libraries(l2kv-rpc-server PRIVATE ggml)
    target_compile_features(l2kv-rpc-server PRIVATE cxx_std_17)
    if (DEFINED SKBUILD_PLATLIB_DIR)
        install(TARGETS l2kv-rpc-server RUNTIME DESTINATION ${SKBUILD_PLATLIB_DIR}/llama_cpp/lib)
        if (APPLE)
            set_target_properties(l2kv-rpc-server PROPERTIES INSTALL_RPATH "@loader_path" BUILD_WITH_INSTALL_RPATH TRUE)
        else()
            set_target_properties(l2kv-rpc-server PROPERTIES INSTALL_RPATH "$ORIGIN" BUILD_WITH_INSTALL_RPATH TRUE)
        endif()
    endif()
endif()

include(GNUInstallDirs)
install(FILES ${LLAMA_L2KV_DIR}/include/llama-l2kv.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
