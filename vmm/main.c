/* mdvm entry point: `mdvm run ...` launches a VM, `mdvm ctl ...` talks to one. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>
#include "config.h"
#include "ctl.h"
#include "loop.h"
#include "migration.h"
#include "qmp.h"
#include "trace.h"
#include "util.h"
#include "vm.h"

void commands_register_memory(struct vm *vm) __attribute__((weak));
void commands_register_migration(struct vm *vm);
void commands_register_balloon(struct vm *vm);
void commands_register_mce(struct vm *vm);
void commands_register_compact(struct vm *vm);

static void usage(FILE *f)
{
	fprintf(f,
		"usage: mdvm run [options]       launch a VM (mdvm run --help)\n"
		"       mdvm ctl [options] CMD   control a running VM (mdvm ctl --help)\n"
		"       mdvm --version\n");
}

/* Setup prints informational lines ("backing: ...", "machine checks: ...")
 * before it can fail (a bad kernel is found after RAM exists). They are held
 * in a memfd behind stderr until the VM is about to run, so that a failed
 * start prints exactly its one-line reason. */
static int held_fd = -1, real_stderr = -1;

static void hold_setup_lines(void)
{
	int fd = memfd_create("mdvm-setup-stderr", MFD_CLOEXEC);

	if (fd <= STDERR_FILENO) {   /* none, or stderr was closed: print as they come */
		if (fd >= 0)
			close(fd);
		return;
	}
	real_stderr = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3);
	if (real_stderr < 0 || dup2(fd, STDERR_FILENO) < 0) {
		if (real_stderr >= 0)
			close(real_stderr);
		close(fd);
		return;
	}
	held_fd = fd;
}

/* Back to the real stderr; print what was held if @replay. */
static void release_setup_lines(bool replay)
{
	char buf[4096];
	ssize_t n;

	if (held_fd < 0)
		return;
	dup2(real_stderr, STDERR_FILENO);
	close(real_stderr);
	if (replay && lseek(held_fd, 0, SEEK_SET) == 0) {
		while ((n = read(held_fd, buf, sizeof(buf))) > 0)
			if (write(STDERR_FILENO, buf, (size_t)n) != n)
				break;
	}
	close(held_fd);
	held_fd = real_stderr = -1;
}

/* A setup failure: its reason is the only line printed. */
static int setup_failed(const char *err)
{
	release_setup_lines(false);
	fprintf(stderr, "mdvm: %s\n", err);
	return 1;
}

/* SIGINT/SIGTERM: the first one is handed to the main loop, which ends the
 * VM as `quit` does but with a SHUTDOWN event "host-signal" and status
 * 128+N (QEMU's shape); a second one exits at once (_exit), in case
 * something is stuck. Only async-signal-safe calls here. */
static int term_efd = -1;
static volatile sig_atomic_t term_sig;

static void on_terminate(int sig)
{
	uint64_t one = 1;
	int saved = errno;

	if (term_sig)
		_exit(128 + sig);   /* the second one: at once, whatever is stuck */
	if (term_efd < 0) {
		loop_quit(128 + sig);
		return;
	}
	term_sig = sig;
	if (write(term_efd, &one, sizeof(one)) < 0)
		loop_quit(128 + sig);
	errno = saved;
}

static void terminate_on_main(void *opaque, uint32_t events)
{
	uint64_t n;
	char reason[64];

	(void)events;
	if (read(term_efd, &n, sizeof(n)) < 0)
		return;
	snprintf(reason, sizeof(reason), "host signal %s", term_sig == SIGINT ? "SIGINT" : "SIGTERM");
	vm_request_exit(opaque, 128 + term_sig, reason);
}

static int run_main(int argc, char **argv)
{
	struct vm_config cfg;
	char err[512];
	struct vm *vm;
	int ret;

	trace_startup("main");
	config_init(&cfg);
	ret = config_parse_run_args(argc, argv, &cfg, err, sizeof(err));
	if (ret < 0) {
		fprintf(stderr, "mdvm: %s\n", err);
		config_free(&cfg);
		return 2;
	}
	if (ret > 0) {   /* --help or --check-config: printed, nothing to run */
		config_free(&cfg);
		return 0;
	}
	if (loop_init() < 0) {
		fprintf(stderr, "mdvm: cannot create the event loop\n");
		return 1;
	}
	trace_startup("vm-create");
	hold_setup_lines();
	vm = vm_create(&cfg, err, sizeof(err));
	if (!vm) {
		config_free(&cfg);
		return setup_failed(err);
	}
	commands_register(vm);
	commands_register_migration(vm);
	commands_register_balloon(vm);
	commands_register_compact(vm);
	/* Listen before the control socket appears: whoever waits for it can
	 * then migrate to us at once. */
	if (cfg.incoming && migration_incoming_listen(vm, cfg.incoming, err, sizeof(err)) < 0) {
		vm_destroy(vm);
		config_free(&cfg);
		return setup_failed(err);
	}
	commands_register_mce(vm);
	if (commands_register_memory)
		commands_register_memory(vm);
	if (cfg.control_path && qmp_server_start(cfg.control_path, err, sizeof(err)) < 0) {
		vm_destroy(vm);
		config_free(&cfg);
		return setup_failed(err);
	}
	release_setup_lines(true);
	signal(SIGPIPE, SIG_IGN);
	term_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (term_efd >= 0 && loop_add_fd(term_efd, EPOLLIN, terminate_on_main, vm) < 0) {
		close(term_efd);
		term_efd = -1;
	}
	signal(SIGINT, on_terminate);
	signal(SIGTERM, on_terminate);
	trace_startup("run");
	if (cfg.incoming ? migration_incoming_start(vm) < 0 : vm_start(vm) < 0) {
		ret = 1;
	} else {
		ret = loop_run();
	}
	qmp_server_stop();
	if (!migration_shutdown(vm)) {
		pr_err("a migration thread did not stop; exiting without cleanup");
		fflush(NULL);
		_exit(ret);
	}
	vm_destroy(vm);
	config_free(&cfg);
	return ret;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	if (!strcmp(argv[1], "run"))
		return run_main(argc - 1, argv + 1);
	if (!strcmp(argv[1], "ctl"))
		return ctl_main(argc - 1, argv + 1);
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
		usage(stdout);
		return 0;
	}
	if (!strcmp(argv[1], "--version")) {
		printf("mdvm 0.1\n");
		return 0;
	}
	fprintf(stderr, "mdvm: unknown command '%s'\n", argv[1]);
	usage(stderr);
	return 2;
}
