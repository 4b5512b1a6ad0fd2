# cuda.mk — the CUDA backend, included by the Makefile.
#
#   make cuda        build/cuda/libnsa.a (the C sources with -DNSA_HAVE_CUDA plus
#                    src/cuda/*.cu), build/cuda/nsa, build/cuda/test_cuda,
#                    build/cuda/test_cuda_bf16, build/cuda/test_wgmma,
#                    build/cuda/bench_attn_cuda and build/cuda/gpu_limits (memory rates of
#                    the GPU). Needs nvcc; builds for sm_90a (wgmma) and sm_90 (Hopper).
#   make cuda-check  builds and runs the three device tests when nvcc is present (they skip
#                    cleanly without a GPU); prints a skip line otherwise.
#
# Variables: CUDA_HOME (default /usr/local/cuda), NVCC, CUDA_ARCH_FLAGS, CUDA_BUILD.

CUDA_HOME ?= /usr/local/cuda
NVCC ?= $(shell command -v nvcc 2>/dev/null || { [ -x $(CUDA_HOME)/bin/nvcc ] && echo $(CUDA_HOME)/bin/nvcc; })
CUDA_BUILD ?= build/cuda
CUDA_ARCH_FLAGS ?= -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_90,code=sm_90
NVCCFLAGS ?= -O3 -std=c++20 -lineinfo $(CUDA_ARCH_FLAGS) -Xcompiler -fPIC -Xcompiler -Wall \
             -Xcompiler -Wno-unused-parameter
CUDA_LDLIBS := -L$(CUDA_HOME)/lib64 -lcublas -lcudart -lstdc++ -lopenblas -lm -ldl -lpthread -lrt

CUDA_C_SRC := $(wildcard src/*.c) $(wildcard src/cpu/*.c)
CUDA_CU_SRC := $(wildcard src/cuda/*.cu)
CUDA_C_OBJ := $(CUDA_C_SRC:%.c=$(CUDA_BUILD)/obj/%.o)
CUDA_CU_OBJ := $(CUDA_CU_SRC:%.cu=$(CUDA_BUILD)/obj/%.cu.o)
CUDA_HDRS := $(wildcard include/*.h src/*.h src/cpu/*.h src/cuda/*.cuh)

.PHONY: cuda cuda-check

ifeq ($(strip $(NVCC)),)
cuda:
	@echo "make cuda: nvcc not found (set CUDA_HOME or NVCC); the CUDA backend is not built" >&2
	@exit 1

cuda-check:
	@echo "skip: nvcc not found, CUDA backend not built"
else
cuda: $(CUDA_BUILD)/libnsa.a $(CUDA_BUILD)/nsa $(CUDA_BUILD)/test_cuda $(CUDA_BUILD)/test_cuda_bf16 \
      $(CUDA_BUILD)/test_wgmma $(CUDA_BUILD)/bench_attn_cuda $(CUDA_BUILD)/gpu_limits

cuda-check: $(CUDA_BUILD)/test_cuda $(CUDA_BUILD)/test_cuda_bf16 $(CUDA_BUILD)/test_wgmma
	$(CUDA_BUILD)/test_wgmma
	$(CUDA_BUILD)/test_cuda
	$(CUDA_BUILD)/test_cuda_bf16

$(CUDA_BUILD)/obj/%.o: %.c $(CUDA_HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) -DNSA_HAVE_CUDA $(BLAS_INC) $(WARN) $(CFLAGS) $(OMPFLAGS) -fPIC \
	    -fvisibility=hidden -c $< -o $@

$(CUDA_BUILD)/obj/%.cu.o: %.cu $(CUDA_HDRS)
	@mkdir -p $(dir $@)
	$(NVCC) $(CPPFLAGS) -DNSA_HAVE_CUDA $(NVCCFLAGS) -c $< -o $@

$(CUDA_BUILD)/libnsa.a: $(CUDA_C_OBJ) $(CUDA_CU_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(CUDA_BUILD)/nsa: $(wildcard tools/*.c tools/*.h) $(CUDA_BUILD)/libnsa.a
	$(CC) $(CPPFLAGS) $(WARN) $(CFLAGS) $(OMPFLAGS) -o $@ $(wildcard tools/*.c) \
	    $(CUDA_BUILD)/libnsa.a $(CUDA_LDLIBS)

$(CUDA_BUILD)/test_cuda $(CUDA_BUILD)/test_cuda_bf16: $(CUDA_BUILD)/%: tests/cuda/%.c \
        tests/cuda/cuda_util.h tests/attn_case.h tests/harness.h $(CUDA_BUILD)/libnsa.a
	$(CC) $(CPPFLAGS) -DNSA_HAVE_CUDA $(WARN) $(CFLAGS) $(OMPFLAGS) -Itests -o $@ $< \
	    $(CUDA_BUILD)/libnsa.a $(CUDA_LDLIBS)

$(CUDA_BUILD)/bench_attn_cuda: bench/bench_attn_cuda.c $(CUDA_BUILD)/libnsa.a
	$(CC) $(CPPFLAGS) -DNSA_HAVE_CUDA -I$(CUDA_HOME)/include $(WARN) $(CFLAGS) $(OMPFLAGS) \
	    -o $@ $< $(CUDA_BUILD)/libnsa.a $(CUDA_LDLIBS)

$(CUDA_BUILD)/test_wgmma: tests/cuda/test_wgmma.cu src/cuda/wgmma.cuh src/cuda/mma.cuh
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -Isrc -o $@ $<

$(CUDA_BUILD)/gpu_limits: bench/gpu_limits.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -o $@ $<
endif
