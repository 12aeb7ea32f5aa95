/* vmm/cmd_compact.c: QMP `compact`, the background compactor, fragmentation figures. */
#ifndef MDVM_CMD_COMPACT_H
#define MDVM_CMD_COMPACT_H
#include <jansson.h>

struct vm;
struct guest_mem;
void commands_register_compact(struct vm *vm);
/* {"hugepages-in-use", "hugepages-needed", "percent", "host-bytes"} */
json_t *compact_fragmentation_json(struct guest_mem *gm);
#endif
