/* VM configuration: libvirt domain XML (configs/) overridden by the CLI. */
#ifndef MDVM_CONFIG_H
#define MDVM_CONFIG_H
#include <stddef.h>
#include <stdint.h>
#include "../mm/mm.h"

enum console_kind { CONSOLE_STDIO = 0, CONSOLE_FILE, CONSOLE_NONE };

/* --inject-memory-error-at GPA[:kind][@ms] (vmm/mce.c, docs/memory-errors.md) */
struct mce_inject_at {
	uint64_t gpa;            /* 4 KiB aligned */
	int kind;                /* 0 action-optional, 1 action-required (enum mce_kind) */
	uint64_t delay_ms;       /* after the VM is created */
};
#define CONFIG_MAX_INJECT_AT 16

struct vm_config {
	char *name;              /* domain name */
	uint64_t mem_size;       /* bytes */
	unsigned ncpus;
	char *kernel;            /* ELF (PVH entry) or bzImage path */
	char *initrd;            /* may be NULL */
	char *cmdline;           /* may be NULL */
	char *control_path;      /* QMP socket, may be NULL */
	enum console_kind console;
	char *console_path;      /* for CONSOLE_FILE */
	enum mm_backing backing;
	int reserve_hugepages;   /* --reserve-hugepages */
	int balloon;             /* virtio-balloon: 1 (default, libvirt's too) or 0 */
	int balloon_autodeflate; /* offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: 1 (default) or 0 */
	int balloon_reporting;   /* offer VIRTIO_BALLOON_F_REPORTING: 1 (default) or 0 */
	int compaction;          /* --compaction auto: background compactor (1), off (0, default) */
	struct mce_inject_at inject_at[CONFIG_MAX_INJECT_AT];
	unsigned n_inject_at;
	char *incoming;          /* --incoming tcp:HOST:PORT|unix:PATH, or NULL */
};

#define CONFIG_DEFAULT_MEM   (256ULL << 20)
#define CONFIG_MAX_CPUS      64
#define CONFIG_MAX_MEM       (1ULL << 42)   /* 4 TiB */

void config_init(struct vm_config *cfg);   /* defaults */
void config_free(struct vm_config *cfg);
/* Parse "512M", "4G", "1T", "4096" (bytes), "64K"; 0 or -1 with err. */
int  config_parse_size(const char *s, uint64_t *out, char *err, size_t errlen);
/* Read libvirt domain XML into cfg. Unsupported elements/values are errors. */
int  config_load_xml(const char *path, struct vm_config *cfg, char *err, size_t errlen);
/* `mdvm run` options: loads --config (or the default config) then applies
 * overrides. Returns 0, 1 when --help was printed, -1 on error (err set). */
int  config_parse_run_args(int argc, char **argv, struct vm_config *cfg, char *err, size_t errlen);
void config_print_run_usage(void *stream /* FILE* */);
/* One --inject-memory-error-at value; 0 or -1 with err. */
int  config_parse_inject_at(const char *s, struct mce_inject_at *out, char *err, size_t errlen);
#endif
