/* A stand-in libcuda.so.1 for a machine without an NVIDIA driver (benchmarks/fake_cuda.py).
 *
 * It exports the driver calls Triton's launcher module (triton/backends/nvidia/driver.c) makes,
 * each answering as an H100/H200 would and touching no device: so Triton's whole launch path --
 * its Python, the C launcher's argument parsing, every tensor's data_ptr() -- runs for real, and
 * only cuLaunchKernelEx, the driver's own launch, does nothing. That call records the launch (grid,
 * block, shared memory, function and the bytes of each kernel parameter) so tests can compare two
 * ways of launching the same kernel at the level of what the driver would receive.
 *
 * Compiled against the cuda.h Triton bundles, so the names map to the same versioned symbols. */
#include <stdint.h>
#include <string.h>

#include "cuda.h"

#define MAX_PARAMS 256
#define MAX_PARAM_BYTES 4096

static long long launch_count = 0;
static uint64_t expected_function = 0;    /* set by the caller: a kernel, its parameters' sizes */
static int param_count = 0;
static int param_sizes[MAX_PARAMS];
static unsigned char last_params[MAX_PARAM_BYTES];
static int last_param_bytes = 0;
static unsigned int last_config[8];       /* grid x y z, block x y z, shared bytes, attributes */
static uint64_t last_function = 0;
static int context_storage, module_storage;
static uint64_t next_function = 0x1000;

/* ---- what benchmarks/fake_cuda.py reads through ctypes */
long long bnrewrite_fake_launches(void) { return launch_count; }

int bnrewrite_fake_expect(uint64_t function, int n, const int *sizes) {
  int total = 0;
  if (n < 0 || n > MAX_PARAMS) return -1;
  for (int i = 0; i < n; ++i) total += sizes[i];
  if (total > MAX_PARAM_BYTES) return -1;
  expected_function = function;
  param_count = n;
  memcpy(param_sizes, sizes, n * sizeof(int));
  return 0;
}

int bnrewrite_fake_last(unsigned int *config, uint64_t *function, unsigned char *params, int capacity) {
  memcpy(config, last_config, sizeof(last_config));
  *function = last_function;
  int n = last_param_bytes < capacity ? last_param_bytes : capacity;
  memcpy(params, last_params, n);
  return last_param_bytes;
}

/* ---- the driver API */
CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **kernelParams, void **extra) {
  (void)extra;
  ++launch_count;
  last_config[0] = config->gridDimX;
  last_config[1] = config->gridDimY;
  last_config[2] = config->gridDimZ;
  last_config[3] = config->blockDimX;
  last_config[4] = config->blockDimY;
  last_config[5] = config->blockDimZ;
  last_config[6] = config->sharedMemBytes;
  last_config[7] = config->numAttrs;
  last_function = (uint64_t)(uintptr_t)f;
  int offset = 0;
  /* only the kernel whose parameter sizes the caller gave: another one's may be fewer */
  for (int i = 0; last_function == expected_function && i < param_count; ++i) {
    memcpy(last_params + offset, kernelParams[i], param_sizes[i]);
    offset += param_sizes[i];
  }
  last_param_bytes = offset;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev) {
  (void)dev;
  switch (attrib) {
  case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *pi = 232448; break;
  case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *pi = 49152; break;
  case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *pi = 132; break;
  case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *pi = 1024; break;
  case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *pi = 32; break;
  case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *pi = 1980000; break;
  case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *pi = 2619000; break;
  case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *pi = 5120; break;
  case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *pi = 9; break;
  case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *pi = 0; break;
  default: *pi = 1;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuFuncGetAttribute(int *pi, CUfunction_attribute attrib, CUfunction hfunc) {
  (void)hfunc;
  switch (attrib) {
  case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *pi = 1024; break;
  case CU_FUNC_ATTRIBUTE_NUM_REGS: *pi = 32; break;
  default: *pi = 0;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuFuncSetAttribute(CUfunction hfunc, CUfunction_attribute attrib, int value) {
  (void)hfunc; (void)attrib; (void)value;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuFuncSetCacheConfig(CUfunction hfunc, CUfunc_cache config) {
  (void)hfunc; (void)config;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleLoadData(CUmodule *module, const void *image) {
  (void)image;
  *module = (CUmodule)&module_storage;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleUnload(CUmodule hmod) { (void)hmod; return CUDA_SUCCESS; }

CUresult CUDAAPI cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name) {
  (void)hmod; (void)name;
  *hfunc = (CUfunction)(uintptr_t)(next_function += 0x10); /* one handle per loaded kernel */
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetCurrent(CUcontext *pctx) { *pctx = (CUcontext)&context_storage; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxSetCurrent(CUcontext ctx) { (void)ctx; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetDevice(CUdevice *device) { *device = 0; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxSetLimit(CUlimit limit, size_t value) { (void)limit; (void)value; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetLimit(size_t *pvalue, CUlimit limit) { (void)limit; *pvalue = 0; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGet(CUdevice *device, int ordinal) { *device = ordinal; return CUDA_SUCCESS; }

CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
  (void)dev;
  *pctx = (CUcontext)&context_storage;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDriverGetVersion(int *driverVersion) { *driverVersion = 13000; return CUDA_SUCCESS; }

CUresult CUDAAPI cuGetErrorString(CUresult error, const char **pStr) {
  (void)error;
  *pStr = "error from the stand-in libcuda (benchmarks/fake_cuda)";
  return CUDA_SUCCESS;
}

/* host tensors' pointers pass for device pointers: the kernels never run */
CUresult CUDAAPI cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr ptr) {
  if (attribute == CU_POINTER_ATTRIBUTE_DEVICE_POINTER) *(CUdeviceptr *)data = ptr;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuPointerGetAttributes(unsigned int numAttributes, CUpointer_attribute *attributes, void **data,
                                        CUdeviceptr ptr) {
  (void)numAttributes; (void)attributes; (void)data; (void)ptr;
  return CUDA_ERROR_NOT_SUPPORTED;
}

CUresult CUDAAPI cuOccupancyMaxActiveClusters(int *numClusters, CUfunction func, const CUlaunchConfig *config) {
  (void)func; (void)config;
  *numClusters = 1;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap *tensorMap, CUtensorMapDataType tensorDataType,
                                        cuuint32_t tensorRank, void *globalAddress, const cuuint64_t *globalDim,
                                        const cuuint64_t *globalStrides, const cuuint32_t *boxDim,
                                        const cuuint32_t *elementStrides, CUtensorMapInterleave interleave,
                                        CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2Promotion,
                                        CUtensorMapFloatOOBfill oobFill) {
  (void)tensorMap; (void)tensorDataType; (void)tensorRank; (void)globalAddress; (void)globalDim;
  (void)globalStrides; (void)boxDim; (void)elementStrides; (void)interleave; (void)swizzle; (void)l2Promotion;
  (void)oobFill;
  return CUDA_ERROR_NOT_SUPPORTED; /* no TMA descriptors: bnrewrite's kernels use none */
}

CUresult CUDAAPI cuTensorMapEncodeIm2col(CUtensorMap *tensorMap, CUtensorMapDataType tensorDataType,
                                         cuuint32_t tensorRank, void *globalAddress, const cuuint64_t *globalDim,
                                         const cuuint64_t *globalStrides, const int *pixelBoxLowerCorner,
                                         const int *pixelBoxUpperCorner, cuuint32_t channelsPerPixel,
                                         cuuint32_t pixelsPerColumn, const cuuint32_t *elementStrides,
                                         CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                         CUtensorMapL2promotion l2Promotion, CUtensorMapFloatOOBfill oobFill) {
  (void)tensorMap; (void)tensorDataType; (void)tensorRank; (void)globalAddress; (void)globalDim;
  (void)globalStrides; (void)pixelBoxLowerCorner; (void)pixelBoxUpperCorner; (void)channelsPerPixel;
  (void)pixelsPerColumn; (void)elementStrides; (void)interleave; (void)swizzle; (void)l2Promotion; (void)oobFill;
  return CUDA_ERROR_NOT_SUPPORTED;
}
