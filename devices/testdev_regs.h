/* Register map of the mdvm test device (MMIO mailbox at MDVM_TESTDEV_GPA).
 * Shared verbatim by the host device model and the test guest. */
#ifndef MDVM_TESTDEV_REGS_H
#define MDVM_TESTDEV_REGS_H

#define TESTDEV_MAGIC_VALUE   0x5444564dU  /* "MVDT" little-endian */
#define TESTDEV_VERSION_VALUE 1U

#define TESTDEV_MAGIC     0x000  /* R32: TESTDEV_MAGIC_VALUE */
#define TESTDEV_VERSION   0x004  /* R32 */
#define TESTDEV_CMD_SEQ   0x008  /* R32: sequence number of the newest posted command (0: none yet) */
#define TESTDEV_WAIT      0x00c  /* R32: blocks the vCPU up to ~50 ms until CMD_SEQ != ACK_SEQ; returns CMD_SEQ */
#define TESTDEV_ACK_SEQ   0x010  /* W32: guest finished command SEQ; response + status are complete */
#define TESTDEV_STATUS    0x014  /* W32: status of the command being acked (0 = ok) */
#define TESTDEV_RESP_CHAR 0x018  /* W8: append one byte to the response text (max 4095 bytes) */
#define TESTDEV_RESP_RESET 0x01c /* W32: discard the response text collected so far */
#define TESTDEV_SWEEPS    0x020  /* W32: guest reports completed walk sweeps (host exposes it) */
/* The test guest's machine-check handler reports its last error here (W32
 * each; STATUS and ADDR are 64-bit as two halves, low first; ERRORS is
 * written last). The host exposes them in QMP query-guest. */
#define TESTDEV_MCE_STATUS 0x028 /* W32 x2: last MCi_STATUS */
#define TESTDEV_MCE_ADDR  0x030  /* W32 x2: last MCi_ADDR */
#define TESTDEV_MCE_BAD   0x038  /* W32: pages dropped */
#define TESTDEV_MCE_ERRORS 0x03c /* W32: errors handled */
#define TESTDEV_CMD_BUF   0x100  /* R: NUL-terminated command text, 1/2/4/8-byte reads */
#define TESTDEV_CMD_MAX   0x100  /* bytes, including the NUL */

#endif
