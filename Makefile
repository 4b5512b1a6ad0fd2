# nsa — build: `make` (library + build/nsa), `make test` (whole suite), `make asan`
# (ASan+UBSan build of the suite), `make cuda` (CUDA backend when nvcc is present).

CC      ?= cc
BUILD   ?= build
ARCH    ?= -march=native
OPT     ?= -O2
CFLAGS  ?= $(OPT) $(ARCH) -g
WARN    := -std=c11 -Wall -Wextra -Wpedantic -Wno-unused-parameter
CPPFLAGS := -Iinclude -Isrc -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE
OMPFLAGS := -fopenmp
BLAS_INC := $(shell [ -f /usr/include/x86_64-linux-gnu/cblas-openblas.h ] && echo -DNSA_CBLAS_OPENBLAS)
LDLIBS  := -lopenblas -lm
SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

LIB_SRC := $(wildcard src/*.c) $(wildcard src/cpu/*.c)
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
LIB_PIC := $(LIB_SRC:%.c=$(BUILD)/pic/%.o)
TEST_SRC := $(wildcard tests/test_*.c)
TEST_BIN := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
TEST_HELPERS := $(filter-out $(TEST_SRC),$(wildcard tests/*.c))

.PHONY: all lib test asan clean cuda
all: lib $(BUILD)/nsa

lib: $(BUILD)/libnsa.a $(BUILD)/libnsa.so

$(BUILD)/obj/%.o: %.c $(wildcard include/*.h src/*.h src/cpu/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(BLAS_INC) $(WARN) $(CFLAGS) $(OMPFLAGS) -fvisibility=hidden -c $< -o $@

$(BUILD)/pic/%.o: %.c $(wildcard include/*.h src/*.h src/cpu/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(BLAS_INC) $(WARN) $(CFLAGS) $(OMPFLAGS) -fPIC -fvisibility=hidden -c $< -o $@

$(BUILD)/libnsa.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/libnsa.so: $(LIB_PIC)
	$(CC) -shared $(OMPFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/nsa: $(wildcard tools/*.c tools/*.h) $(BUILD)/libnsa.a
	$(CC) $(CPPFLAGS) $(WARN) $(CFLAGS) $(OMPFLAGS) -o $@ $(wildcard tools/*.c) $(BUILD)/libnsa.a $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(TEST_HELPERS) $(wildcard tests/*.h) $(BUILD)/libnsa.a
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(WARN) $(CFLAGS) $(OMPFLAGS) -Itests -o $@ $< $(TEST_HELPERS) $(BUILD)/libnsa.a $(LDLIBS)

tests: $(TEST_BIN)

test: all $(TEST_BIN)
	@BUILD=$(BUILD) bash tests/run.sh

# The C and command-line tests built with AddressSanitizer and UndefinedBehaviorSanitizer
# (the PyTorch comparisons run in `make test`; they test numbers, not memory).
asan:
	NSA_SKIP_PY=1 $(MAKE) BUILD=build/asan OPT=-O1 CFLAGS="-O1 -g $(ARCH) $(SANFLAGS)" \
	    LDLIBS="-lopenblas -lm $(SANFLAGS)" test

clean:
	rm -rf $(BUILD) build

# The CUDA backend (built only by `make cuda`, when nvcc is present): see cuda.mk.
-include cuda.mk
