/* `mdvm ctl`: command-line QMP client (see docs/control.md). */
#ifndef MDVM_CTL_H
#define MDVM_CTL_H
/* argv[0] is "ctl". Returns the process exit status: 0 success, 1 the
 * command failed (QMP error, or a guest command with non-zero status),
 * 2 usage, connection or protocol error. */
int ctl_main(int argc, char **argv);
#endif
