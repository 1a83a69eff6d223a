/* A qemu TCG plugin that counts the guest instructions a program executes.
 *
 * Debian's qemu-user is built with plugin support but ships no plugins (no libinsn.so), so
 * nativeq builds this one with the host C compiler (nativeq.runtime.emulate.build_insn_plugin).
 * At exit it writes "insns <count>" to qemu's plugin log (`-d plugin -D FILE`).
 *
 * With the argument `tb=on` (`-plugin libnativeq_insn.so,tb=on`) it also counts the instructions
 * executed per translation-block start address and writes one line "tb <hex vaddr> <count>" per
 * address after the "insns" line (nativeq.runtime.emulated_profile maps them to kernels).
 *
 * The few declarations below are the stable qemu plugin C API (include/qemu/qemu-plugin.h,
 * API version 1, qemu 4.2 - 7.2); they are declared here because Debian ships no qemu headers.
 * qemu 7.2 has neither the per-vCPU inline ops nor the scoreboard API (both qemu 9.0): the
 * counters are plain uint64_t that the translated code adds to inline.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QEMU_PLUGIN_EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
                                              uint64_t imm);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
void qemu_plugin_outs(const char *string);

QEMU_PLUGIN_EXPORT int qemu_plugin_version = 1;

/* NOTE: one counter for all vCPUs; exact for the single-threaded runs nativeq makes (TVM_NUM_THREADS=1). */
static uint64_t insn_count;

/* ---- per translation block (tb=on) ----
 * One counter per TB start address, kept at a fixed place (allocated in chunks, never moved) because
 * the translated code adds to it by address; an open-addressing hash table of pointers finds it at
 * translation time (a retranslated block, e.g. after its page was unmapped, adds to the same counter). */
struct tb_counter {
  uint64_t vaddr;
  uint64_t insns;
};

#define CHUNK_COUNTERS 4096

struct chunk {
  struct chunk *next;
  size_t used;
  struct tb_counter counters[CHUNK_COUNTERS];
};

static int per_tb;
static pthread_mutex_t tb_lock = PTHREAD_MUTEX_INITIALIZER;
static struct chunk *chunks;
static struct tb_counter **table; /* open addressing, linear probing; capacity a power of two */
static size_t table_cap, table_len;
static uint64_t lost_tbs; /* translations left uncounted (out of memory): reported, never silent */

static size_t slot_of(uint64_t vaddr, size_t cap) {
  uint64_t h = vaddr * 0x9E3779B97F4A7C15ull; /* Fibonacci hashing: instruction addresses are 4-aligned */
  return (size_t)(h >> 17) & (cap - 1);
}

static int grow(void) {
  size_t cap = table_cap ? 2 * table_cap : 1 << 14;
  struct tb_counter **bigger = calloc(cap, sizeof *bigger);
  if (bigger == NULL) return -1;
  for (size_t i = 0; i < table_cap; ++i) {
    if (table[i] == NULL) continue;
    size_t s = slot_of(table[i]->vaddr, cap);
    while (bigger[s] != NULL) s = (s + 1) & (cap - 1);
    bigger[s] = table[i];
  }
  free(table);
  table = bigger;
  table_cap = cap;
  return 0;
}

/* The counter of `vaddr`, created on first sight; NULL when out of memory. Called with tb_lock held. */
static struct tb_counter *counter_of(uint64_t vaddr) {
  if (2 * (table_len + 1) > table_cap && grow() != 0) return NULL;
  size_t s = slot_of(vaddr, table_cap);
  while (table[s] != NULL) {
    if (table[s]->vaddr == vaddr) return table[s];
    s = (s + 1) & (table_cap - 1);
  }
  if (chunks == NULL || chunks->used == CHUNK_COUNTERS) {
    struct chunk *c = calloc(1, sizeof *c);
    if (c == NULL) return NULL;
    c->next = chunks;
    chunks = c;
  }
  struct tb_counter *counter = &chunks->counters[chunks->used++];
  counter->vaddr = vaddr;
  table[s] = counter;
  ++table_len;
  return counter;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  size_t n = qemu_plugin_tb_n_insns(tb);
  /* Every execution of this translation block adds its instruction count, inline in the generated code. */
  qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insn_count, n);
  if (per_tb) {
    pthread_mutex_lock(&tb_lock);
    struct tb_counter *counter = counter_of(qemu_plugin_tb_vaddr(tb));
    pthread_mutex_unlock(&tb_lock);
    if (counter != NULL) {
      qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &counter->insns, n);
    } else {
      ++lost_tbs;
    }
  }
}

static void write_tb_counts(void) {
  static char buffer[1 << 16];
  size_t used = 0;
  for (struct chunk *c = chunks; c != NULL; c = c->next) {
    for (size_t i = 0; i < c->used; ++i) {
      if (c->counters[i].insns == 0) continue;
      if (used + 64 > sizeof buffer) {
        qemu_plugin_outs(buffer);
        used = 0;
      }
      used += (size_t)snprintf(buffer + used, sizeof buffer - used, "tb %" PRIx64 " %" PRIu64 "\n",
                               c->counters[i].vaddr, c->counters[i].insns);
    }
  }
  if (used) qemu_plugin_outs(buffer);
}

static void at_exit(qemu_plugin_id_t id, void *userdata) {
  (void)id;
  (void)userdata;
  char line[64];
  snprintf(line, sizeof line, "insns %" PRIu64 "\n", insn_count);
  qemu_plugin_outs(line);
  if (per_tb) {
    write_tb_counts();
    if (lost_tbs) {
      snprintf(line, sizeof line, "tb_lost %" PRIu64 "\n", lost_tbs);
      qemu_plugin_outs(line);
    }
  }
}

/* Plugin arguments arrive as "key=value" strings (`-plugin LIB.so,tb=on`). */
static int parse_args(int argc, char **argv) {
  for (int i = 0; i < argc; ++i) {
    const char *arg = argv[i];
    if (strcmp(arg, "tb=on") == 0 || strcmp(arg, "tb=true") == 0) {
      per_tb = 1;
    } else if (strcmp(arg, "tb=off") == 0 || strcmp(arg, "tb=false") == 0) {
      per_tb = 0;
    } else {
      fprintf(stderr, "libnativeq_insn: unknown argument '%s' (known: tb=on|off)\n", arg);
      return -1;
    }
  }
  return 0;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
  (void)info;
  if (parse_args(argc, argv) != 0) return -1;
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
  qemu_plugin_register_atexit_cb(id, at_exit, NULL);
  return 0;
}
