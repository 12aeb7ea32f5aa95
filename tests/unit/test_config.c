/* Unit tests for vmm/config.c: sizes, libvirt domain XML, `mdvm run` options.
 * XML files are written to a fresh temporary directory per test. */
#include <check.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../vmm/config.h"

static char tmpdir[64];         /* mkdtemp result, short on purpose */
static char kernel[PATH_MAX];     /* an existing, readable "kernel" file */
static int saved_cwd = -1;
static char err[1024];
static struct vm_config cfg;

static void write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	ck_assert_msg(f != NULL, "cannot create %s", path);
	fputs(text, f);
	fclose(f);
}

/* Path of `name` inside the test directory (static buffer rotation). */
static const char *tpath(const char *name)
{
	static char bufs[4][PATH_MAX];
	static int i;
	char *b = bufs[i++ % 4];

	snprintf(b, PATH_MAX, "%s/%s", tmpdir, name);
	return b;
}

static const char *write_xml(const char *name, const char *text)
{
	const char *p = tpath(name);

	write_file(p, text);
	return p;
}

static void setup(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/mdvm-config-test.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(tmpdir));
	snprintf(kernel, sizeof(kernel), "%s/k.elf", tmpdir);
	write_file(kernel, "\177ELF not really\n");
	saved_cwd = open(".", O_RDONLY | O_DIRECTORY);
	ck_assert_int_ge(saved_cwd, 0);
	err[0] = '\0';
	config_init(&cfg);
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
	return remove(p);
}

static void teardown(void)
{
	config_free(&cfg);
	/* Tests that chdir() must not leak into the next one (CK_FORK=no). */
	if (saved_cwd >= 0) {
		if (fchdir(saved_cwd) < 0)
			perror("fchdir");
		close(saved_cwd);
		saved_cwd = -1;
	}
	nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* ------------------------------------------------------------------ sizes */

START_TEST(size_good)
{
	static const struct { const char *s; uint64_t v; } t[] = {
		{ "4096", 4096 },
		{ "1", 1 },
		{ "64K", 64ULL << 10 },
		{ "64k", 64ULL << 10 },
		{ "512M", 512ULL << 20 },
		{ "4G", 4ULL << 30 },
		{ "1T", 1ULL << 40 },
		{ "512MiB", 512ULL << 20 },
		{ "4GiB", 4ULL << 30 },
		{ "2KiB", 2048 },
		{ "16777215T", 16777215ULL << 40 },
		{ "18446744073709551615", UINT64_MAX },
	};

	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		uint64_t v = 0;

		ck_assert_msg(config_parse_size(t[i].s, &v, err, sizeof(err)) == 0,
			      "'%s' rejected: %s", t[i].s, err);
		ck_assert_msg(v == t[i].v, "'%s' -> %llu", t[i].s, (unsigned long long)v);
	}
}
END_TEST

START_TEST(size_bad)
{
	static const struct { const char *s; const char *msg; } t[] = {
		{ "4X", "invalid size '4X': expected a number with an optional K/M/G/T suffix" },
		{ "", "invalid size '': expected a number with an optional K/M/G/T suffix" },
		{ "-1", "invalid size '-1': expected a number with an optional K/M/G/T suffix" },
		{ "-1G", "invalid size '-1G': expected a number with an optional K/M/G/T suffix" },
		{ "+1", "invalid size '+1': expected a number" },
		{ " 1", "invalid size ' 1': expected a number" },
		{ "1 M", "invalid size '1 M': expected a number" },
		{ "M", "invalid size 'M': expected a number" },
		{ "1MB", "invalid size '1MB': expected a number" },
		{ "1.5G", "invalid size '1.5G': expected a number" },
		{ "1Gi", "invalid size '1Gi': expected a number" },
		{ "0x10", "invalid size '0x10': expected a number" },
		{ "99999999999999999999999X", "invalid size '99999999999999999999999X': expected a number" },
		{ "0", "invalid size '0': must be greater than zero" },
		{ "0M", "invalid size '0M': must be greater than zero" },
		{ "18446744073709551616", "invalid size '18446744073709551616': too large" },
		{ "16777216T", "invalid size '16777216T': too large" },
		{ "99999999999999999999999G", "invalid size '99999999999999999999999G': too large" },
	};

	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		uint64_t v = 12345;

		err[0] = '\0';
		ck_assert_msg(config_parse_size(t[i].s, &v, err, sizeof(err)) == -1,
			      "'%s' accepted", t[i].s);
		ck_assert_msg(strncmp(err, t[i].msg, strlen(t[i].msg)) == 0,
			      "'%s': got \"%s\", want \"%s\"", t[i].s, err, t[i].msg);
		ck_assert_msg(v == 12345, "'%s' wrote the output on error", t[i].s);
	}
}
END_TEST

START_TEST(defaults)
{
	ck_assert_uint_eq(cfg.mem_size, 256ULL << 20);
	ck_assert_uint_eq(cfg.ncpus, 1);
	ck_assert_int_eq(cfg.console, CONSOLE_STDIO);
	ck_assert_int_eq(cfg.backing, MM_BACKING_AUTO);
	ck_assert_ptr_null(cfg.kernel);
	ck_assert_ptr_null(cfg.cmdline);
	ck_assert_ptr_null(cfg.control_path);
	ck_assert_int_eq(cfg.reserve_hugepages, 0);
	ck_assert_int_eq(cfg.balloon, 1);
	ck_assert_int_eq(cfg.compaction, 0);
}
END_TEST


/* -------------------------------------------------------------- XML: good */

START_TEST(xml_full)
{
	const char *p = write_xml("full.xml",
		"<domain type='kvm' id='3'>\n"
		"  <name>vm1</name>\n"
		"  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>\n"
		"  <title>t</title><description>d</description>\n"
		"  <metadata>\n"
		"    <app:x xmlns:app='http://example.org/app'><app:y/></app:x>\n"
		"    <mdvm:config xmlns:mdvm='https://mdvm.dev/schemas/domain/1.0'>\n"
		"      <mdvm:backing>memfd</mdvm:backing>\n"
		"      <mdvm:control path='/run/vm1.sock'/>\n"
		"    </mdvm:config>\n"
		"  </metadata>\n"
		"  <memory unit='GiB'>1</memory>\n"
		"  <currentMemory unit='MiB'>1024</currentMemory>\n"
		"  <vcpu placement='static' current='3'>3</vcpu>\n"
		"  <os>\n"
		"    <type arch='x86_64'>hvm</type>\n"
		"    <kernel>k.elf</kernel>\n"
		"    <initrd>/boot/initrd.img</initrd>\n"
		"    <cmdline>console=ttyS0  walk </cmdline>\n"
		"  </os>\n"
		"  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>\n"
		"  <devices>\n"
		"    <emulator>/usr/bin/mdvm</emulator>\n"
		"    <serial type='file'><source path='/tmp/console.log'/><target port='0'/></serial>\n"
		"    <console type='file'><source path='/tmp/console.log'/><target type='serial' port='0'/></console>\n"
		"    <memballoon model='none'/>\n"
		"  </devices>\n"
		"</domain>\n");

	ck_assert_msg(config_load_xml(p, &cfg, err, sizeof(err)) == 0, "%s", err);
	ck_assert_str_eq(cfg.name, "vm1");
	ck_assert_uint_eq(cfg.mem_size, 1ULL << 30);
	ck_assert_uint_eq(cfg.ncpus, 3);
	ck_assert_str_eq(cfg.kernel, tpath("k.elf"));   /* relative to the file */
	ck_assert_str_eq(cfg.initrd, "/boot/initrd.img");
	ck_assert_str_eq(cfg.cmdline, "console=ttyS0  walk ");  /* verbatim */
	ck_assert_int_eq(cfg.console, CONSOLE_FILE);
	ck_assert_str_eq(cfg.console_path, "/tmp/console.log");
	ck_assert_int_eq(cfg.backing, MM_BACKING_MEMFD);
	ck_assert_str_eq(cfg.control_path, "/run/vm1.sock");
}
END_TEST

START_TEST(xml_minimal_and_mdvm_kernel)
{
	/* No <devices>: no console. mdvm:kernel and control relative to the file. */
	const char *p = write_xml("min.xml",
		"<domain type='kvm'>\n"
		"  <name>m</name>\n"
		"  <metadata><mdvm:config xmlns:mdvm='https://mdvm.dev/schemas/domain/1.0'>"
		"<mdvm:kernel>sub/../k.elf</mdvm:kernel><mdvm:control path='c.sock'/></mdvm:config></metadata>\n"
		"  <memory>262144</memory>\n"
		"  <os><type>hvm</type></os>\n"
		"</domain>\n");

	ck_assert_msg(config_load_xml(p, &cfg, err, sizeof(err)) == 0, "%s", err);
	ck_assert_uint_eq(cfg.mem_size, 256ULL << 20);   /* default unit KiB */
	ck_assert_uint_eq(cfg.ncpus, 1);
	ck_assert_str_eq(cfg.kernel, tpath("sub/../k.elf"));
	ck_assert_str_eq(cfg.control_path, tpath("c.sock"));
	ck_assert_ptr_null(cfg.cmdline);
	ck_assert_ptr_null(cfg.initrd);
	ck_assert_int_eq(cfg.console, CONSOLE_NONE);
}
END_TEST

START_TEST(xml_units)
{
	static const struct { const char *unit; const char *val; uint64_t bytes; } t[] = {
		{ "bytes", "4194304", 4ULL << 20 },
		{ "b", "4194304", 4ULL << 20 },
		{ "KiB", "4096", 4ULL << 20 },
		{ "k", "4096", 4ULL << 20 },
		{ "KB", "4096000", 4096000000ULL },
		{ "M", "64", 64ULL << 20 },
		{ "MiB", "64", 64ULL << 20 },
		{ "MB", "4096", 4096000000ULL },
		{ "G", "2", 2ULL << 30 },
		{ "gib", "2", 2ULL << 30 },
		{ "TiB", "1", 1ULL << 40 },
		{ "T", "4", 4ULL << 40 },
	};

	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		char xml[1024];
		const char *p;

		snprintf(xml, sizeof(xml),
			 "<domain type='kvm'><name>u</name><memory unit='%s'>%s</memory>"
			 "<os><type>hvm</type></os></domain>\n", t[i].unit, t[i].val);
		p = write_xml("u.xml", xml);
		ck_assert_msg(config_load_xml(p, &cfg, err, sizeof(err)) == 0, "%s: %s", t[i].unit, err);
		ck_assert_msg(cfg.mem_size == t[i].bytes, "%s %s -> %llu", t[i].val, t[i].unit,
			      (unsigned long long)cfg.mem_size);
	}
}
END_TEST

START_TEST(xml_hugepages)
{
	const char *p = write_xml("h.xml",
		"<domain type='kvm'><name>h</name><memory unit='MiB'>64</memory>\n"
		"<memoryBacking><hugepages><page size='2048' unit='KiB'/></hugepages></memoryBacking>\n"
		"<os><type>hvm</type></os></domain>\n");

	ck_assert_msg(config_load_xml(p, &cfg, err, sizeof(err)) == 0, "%s", err);
	ck_assert_int_eq(cfg.backing, MM_BACKING_HUGETLB);
}
END_TEST

START_TEST(xml_consoles)
{
	static const struct { const char *devices; enum console_kind kind; const char *path; } t[] = {
		{ "<serial type='pty'/>", CONSOLE_STDIO, NULL },
		{ "<serial type='stdio'/>", CONSOLE_STDIO, NULL },
		{ "<serial type='null'/>", CONSOLE_NONE, NULL },
		{ "<console type='pty'><target type='serial' port='0'/></console>", CONSOLE_STDIO, NULL },
		{ "<serial type='pty'><target port='0'/><alias name='serial0'/></serial>"
		  "<console type='pty'><target type='serial' port='0'/></console>", CONSOLE_STDIO, NULL },
		{ "<serial type='file'><source path='out.log'/></serial>", CONSOLE_FILE, "out.log" },
		{ "<console type='file'><source path='/var/log/c.log' append='on'/></console>",
		  CONSOLE_FILE, "/var/log/c.log" },
		{ "", CONSOLE_NONE, NULL },
	};

	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		char xml[1024];
		const char *p;

		snprintf(xml, sizeof(xml),
			 "<domain type='kvm'><name>c</name><memory unit='MiB'>64</memory>"
			 "<os><type>hvm</type></os><devices>%s</devices></domain>\n", t[i].devices);
		p = write_xml("c.xml", xml);
		config_free(&cfg);
		config_init(&cfg);
		ck_assert_msg(config_load_xml(p, &cfg, err, sizeof(err)) == 0, "%s: %s", t[i].devices, err);
		ck_assert_msg(cfg.console == t[i].kind, "%s: kind %d", t[i].devices, cfg.console);
		if (t[i].path && t[i].path[0] == '/')
			ck_assert_str_eq(cfg.console_path, t[i].path);
		else if (t[i].path)
			ck_assert_str_eq(cfg.console_path, tpath(t[i].path));
		else
			ck_assert_ptr_null(cfg.console_path);
	}
}
END_TEST

START_TEST(xml_repo_configs)
{
	/* The shipped configs parse (their kernel need not exist yet). */
	static const char *const files[] = { "configs/default.xml", "configs/walk.xml",
					     "configs/hugetlb.xml" };

	for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
		if (access(files[i], R_OK) != 0)
			continue;   /* not run from the repository root */
		config_free(&cfg);
		config_init(&cfg);
		ck_assert_msg(config_load_xml(files[i], &cfg, err, sizeof(err)) == 0, "%s", err);
		ck_assert_str_eq(cfg.kernel, "configs/../guest/mdvm-guest.elf");
		ck_assert_int_eq(cfg.console, CONSOLE_STDIO);
		if (i == 0) {
			ck_assert_str_eq(cfg.name, "mdvm-default");
			ck_assert_uint_eq(cfg.mem_size, 256ULL << 20);
			ck_assert_uint_eq(cfg.ncpus, 2);
			ck_assert_str_eq(cfg.cmdline, "echo hello from the mdvm test guest; "
					 "fill size=1M; verify size=1M; poweroff");
		} else if (i == 1) {
			ck_assert_uint_eq(cfg.mem_size, 128ULL << 20);
			ck_assert_uint_eq(cfg.ncpus, 1);
			ck_assert_str_eq(cfg.cmdline, "walk");
		} else {
			ck_assert_int_eq(cfg.backing, MM_BACKING_HUGETLB);
		}
	}
}
END_TEST

/* --------------------------------------------------------- XML: rejections */

/* Each body is inserted at line 3 of a valid skeleton, so "bad.xml:3:" is
 * where a top-level offender sits. */
static const struct {
	const char *body;   /* domain children after name/memory/os */
	const char *msg;    /* expected message after "<path>:" */
} xml_bad[] = {
	{ "<interface type='network'/>", "3: <interface> is not supported by mdvm" },
	{ "<devices>\n<disk type='file'/></devices>", "4: <disk> is not supported by mdvm" },
	{ "<cpu mode='host-passthrough'/>", "3: <cpu> is not supported by mdvm" },
	{ "<features><acpi/></features>", "3: <features> is not supported by mdvm" },
	{ "<numatune/>", "3: <numatune> is not supported by mdvm" },
	{ "<clock offset='utc'/>", "3: <clock> is not supported by mdvm" },
	{ "<memoryBacking><locked/></memoryBacking>", "3: <locked> is not supported by mdvm" },
	{ "<memoryBacking><hugepages><page size='1' unit='GiB'/></hugepages></memoryBacking>",
	  "3: <page size='1' unit='GiB'>: only 2 MiB huge pages are supported" },
	{ "<vcpu>0</vcpu>", "3: invalid vCPU count '0': expected a number from 1 to 64" },
	{ "<vcpu>65</vcpu>", "3: invalid vCPU count '65'" },
	{ "<vcpu>two</vcpu>", "3: invalid vCPU count 'two'" },
	{ "<vcpu cpuset='1-3'>2</vcpu>", "3: attribute 'cpuset' of <vcpu> is not supported by mdvm" },
	{ "<vcpu current='1'>2</vcpu>", "3: <vcpu current='1'> differs from the vCPU count 2" },
	{ "<currentMemory unit='MiB'>32</currentMemory>",
	  "3: currentMemory != memory is not supported; use the balloon" },
	{ "<devices><serial type='tcp'/></devices>", "3: <serial type='tcp'> is not supported by mdvm" },
	{ "<devices><serial type='file'/></devices>", "3: <serial type='file'> needs <source path='...'/>" },
	{ "<devices><serial/></devices>", "3: <serial> needs a type attribute" },
	{ "<devices><serial type='pty'/><serial type='pty'/></devices>",
	  "3: only one <serial> is supported by mdvm" },
	{ "<devices><serial type='pty'><target port='1'/></serial></devices>",
	  "3: <target port='1'>: mdvm has a single serial port, port 0" },
	{ "<devices><console type='pty'><target type='virtio'/></console></devices>",
	  "3: <target type='virtio'> is not supported by mdvm" },
	{ "<devices><serial type='pty'/>\n<console type='null'/></devices>",
	  "4: <console> differs from <serial>; mdvm has one serial port" },
	{ "<devices><memballoon model='xen'/></devices>", "3: <memballoon> is not supported by mdvm" },
	{ "<devices><memballoon/></devices>", "3: <memballoon> is not supported by mdvm" },
	{ "<devices><memballoon model='virtio' autodeflate='maybe'/></devices>",
	  "3: <memballoon autodeflate='maybe'>: expected 'on' or 'off'" },
	{ "<devices><memballoon model='virtio' deflate='on'/></devices>",
	  "3: attribute 'deflate' of <memballoon> is not supported by mdvm" },
	{ "<name>again</name>", "3: <name> given more than once" },
	{ "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'/>",
	  "3: <qemu:commandline> is not supported by mdvm" },
	{ "<metadata><mdvm:config xmlns:mdvm='https://mdvm.dev/schemas/domain/1.0'>"
	  "<mdvm:backing>huge</mdvm:backing></mdvm:config></metadata>",
	  "3: <mdvm:backing>: unknown backing 'huge' (use auto, hugetlb, thp, memfd or anon)" },
	{ "<metadata><mdvm:config xmlns:mdvm='https://mdvm.dev/schemas/domain/1.0'>"
	  "<mdvm:frobnicate/></mdvm:config></metadata>", "3: <mdvm:frobnicate> is not supported by mdvm" },
	{ "<metadata><mdvm:config xmlns:mdvm='https://mdvm.dev/schemas/domain/1.0'>"
	  "<mdvm:control/></mdvm:config></metadata>", "3: <mdvm:control> needs a path attribute" },
	{ "<metadata><mdvm:config xmlns:mdvm='https://mdvm.dev/schemas/domain/1.0'>"
	  "<mdvm:backing>thp</mdvm:backing></mdvm:config></metadata>\n"
	  "<memoryBacking><hugepages/></memoryBacking>",
	  "1: <memoryBacking><hugepages/> conflicts with <mdvm:backing>thp</mdvm:backing>" },
	{ "<metadata><mdvm:config xmlns:mdvm='https://mdvm.dev/schemas/domain/1.0'>"
	  "<mdvm:kernel>a.elf</mdvm:kernel></mdvm:config></metadata>\n"
	  "<os><type>hvm</type><kernel>/b.elf</kernel></os>",
	  "3: <mdvm:kernel> and <os><kernel> both given; use one" },
};

static const char *xml_bad_os[] = {
	/* rejected <os> contents: (os body, expected message at line 3) */
	"<type arch='x86_64'>hvm</type><initrd> </initrd>", "3: <initrd> is empty",
	"<type>hvm</type><initrd>/a</initrd><initrd>/b</initrd>", "3: <initrd> given more than once",
	"<type>hvm</type><loader>/usr/share/OVMF.fd</loader>", "3: <loader> is not supported by mdvm",
	"<type>hvm</type><boot dev='hd'/>", "3: <boot> is not supported by mdvm",
	"<type arch='aarch64'>hvm</type>", "3: <type arch='aarch64'>: only x86_64 guests are supported",
	"<type>xen</type>", "3: <type>xen</type>: only 'hvm' is supported",
	"<type machine='q35'>hvm</type>", "3: attribute 'machine' of <type> is not supported by mdvm",
	"<kernel>/k</kernel>", "3: <os> needs <type arch='x86_64'>hvm</type>",
	"<type>hvm</type><smbios mode='host'/>", "3: <smbios> is not supported by mdvm",
};

static void expect_xml_error(const char *text, const char *want)
{
	const char *p = write_xml("bad.xml", text);
	char full[1024];

	config_free(&cfg);
	config_init(&cfg);
	err[0] = '\0';
	snprintf(full, sizeof(full), "%s:%s", p, want);
	ck_assert_msg(config_load_xml(p, &cfg, err, sizeof(err)) == -1, "accepted:\n%s", text);
	ck_assert_msg(strncmp(err, full, strlen(full)) == 0, "got \"%s\"\nwant \"%s\"", err, full);
}

START_TEST(xml_rejections)
{
	for (size_t i = 0; i < sizeof(xml_bad) / sizeof(xml_bad[0]); i++) {
		char xml[2048];
		int os_in_body = strstr(xml_bad[i].body, "<os>") != NULL;

		snprintf(xml, sizeof(xml),
			 "<domain type='kvm'>\n"
			 "<name>b</name><memory unit='MiB'>64</memory>%s\n"
			 "%s\n"
			 "</domain>\n",
			 os_in_body ? "" : "<os><type>hvm</type></os>", xml_bad[i].body);
		expect_xml_error(xml, xml_bad[i].msg);
	}
	for (size_t i = 0; i < sizeof(xml_bad_os) / sizeof(xml_bad_os[0]); i += 2) {
		char xml[2048];

		snprintf(xml, sizeof(xml),
			 "<domain type='kvm'>\n"
			 "<name>b</name><memory unit='MiB'>64</memory>\n"
			 "<os>%s</os>\n"
			 "</domain>\n", xml_bad_os[i]);
		expect_xml_error(xml, xml_bad_os[i + 1]);
	}
}
END_TEST

START_TEST(xml_rejections_domain)
{
	expect_xml_error("<domain type='qemu'><name>q</name></domain>\n",
			 "1: <domain type='qemu'>: mdvm runs only type='kvm' domains");
	expect_xml_error("<domain><name>q</name></domain>\n",
			 "1: <domain type=''>: mdvm runs only type='kvm' domains");
	expect_xml_error("<vm type='kvm'/>\n", "1: the root element must be <domain type='kvm'>");
	expect_xml_error("<domain type='kvm'>\n<name>n</name>\n<os><type>hvm</type></os></domain>\n",
			 "1: <memory> is required");
	expect_xml_error("<domain type='kvm'>\n<name>n</name><memory>65536</memory></domain>\n",
			 "1: <os> is required");
	expect_xml_error("<domain type='kvm'>\n<memory unit='MiB'>1</memory></domain>\n",
			 "2: memory 1 MiB is below the minimum of 2 MiB");
	expect_xml_error("<domain type='kvm'>\n<memory unit='TiB'>5</memory></domain>\n",
			 "2: memory 5 TiB exceeds the maximum of 4 TiB");
	expect_xml_error("<domain type='kvm'>\n<memory unit='b'>4194305</memory></domain>\n",
			 "2: memory 4194305 bytes is not a multiple of 4 KiB");
	expect_xml_error("<domain type='kvm'>\n<memory unit='furlongs'>4</memory></domain>\n",
			 "2: <memory>: unknown unit 'furlongs'");
	expect_xml_error("<domain type='kvm'>\n<memory>-4</memory></domain>\n",
			 "2: <memory>: invalid value '-4': expected a whole number");
	expect_xml_error("<domain type='kvm'>\n<memory unit='EiB'>100</memory></domain>\n",
			 "2: <memory>: value '100 EiB' is too large");
	expect_xml_error("<domain type='kvm'>\n<name>n</name>\n<memory>65536</memory>\n",
			 "4: ");   /* not well-formed: libxml2's message, with the line */
}
END_TEST

START_TEST(xml_missing_file)
{
	const char *p = tpath("nope.xml");
	char want[PATH_MAX + 64];

	ck_assert_int_eq(config_load_xml(p, &cfg, err, sizeof(err)), -1);
	snprintf(want, sizeof(want), "%s: No such file or directory", p);
	ck_assert_str_eq(err, want);
}
END_TEST

START_TEST(xml_cmdline_too_long)
{
	static char xml[8192];
	char cmd[4097];

	memset(cmd, 'a', 4096);
	cmd[4096] = '\0';
	snprintf(xml, sizeof(xml), "<domain type='kvm'><memory>65536</memory>\n"
		 "<os><type>hvm</type><cmdline>%s</cmdline></os></domain>\n", cmd);
	expect_xml_error(xml, "2: cmdline is 4096 bytes; the limit is 4095");
}
END_TEST

/* --------------------------------------------------------------- the CLI */

#define RUN(...) run_args((char *[]){ "run", __VA_ARGS__, NULL })
static int run_args(char **argv)
{
	int argc = 0;

	while (argv[argc])
		argc++;
	config_free(&cfg);
	config_init(&cfg);
	err[0] = '\0';
	return config_parse_run_args(argc, argv, &cfg, err, sizeof(err));
}

/* Run with stdout sent to a file; returns what was printed (static). */
static const char *captured(int *ret, char **argv)
{
	static char out[8192];
	int fd = open(tpath("stdout"), O_WRONLY | O_CREAT | O_TRUNC, 0600);
	int saved = dup(STDOUT_FILENO);
	FILE *f;
	size_t n;

	fflush(stdout);
	dup2(fd, STDOUT_FILENO);
	close(fd);
	*ret = run_args(argv);
	fflush(stdout);
	dup2(saved, STDOUT_FILENO);
	close(saved);
	f = fopen(tpath("stdout"), "r");
	n = fread(out, 1, sizeof(out) - 1, f);
	out[n] = '\0';
	fclose(f);
	return out;
}

START_TEST(cli_kernel_only)
{
	ck_assert_msg(RUN("--kernel", kernel) == 0, "%s", err);
	ck_assert_str_eq(cfg.kernel, kernel);
	ck_assert_uint_eq(cfg.mem_size, 256ULL << 20);
	ck_assert_uint_eq(cfg.ncpus, 1);
	ck_assert_int_eq(cfg.console, CONSOLE_STDIO);
	ck_assert_int_eq(cfg.backing, MM_BACKING_AUTO);
}
END_TEST

START_TEST(cli_all_options)
{
	ck_assert_msg(RUN("--kernel", kernel, "--memory", "1G", "--cpus", "4", "--cmdline", "walk",
			  "--control", "/tmp/q.sock", "--console", "file:/tmp/out.log",
			  "--backing", "thp", "--reserve-hugepages") == -1, "accepted");
	/* reserving huge pages only makes sense for hugetlb/auto */
	ck_assert_str_eq(err, "--reserve-hugepages needs --backing hugetlb or auto (backing is thp)");

	ck_assert_msg(RUN("--kernel", kernel, "--memory=1G", "--cpus=4", "--cmdline", "walk",
			  "--control", "/tmp/q.sock", "--console", "file:/tmp/out.log",
			  "--backing", "hugetlb", "--reserve-hugepages") == 0, "%s", err);
	ck_assert_uint_eq(cfg.mem_size, 1ULL << 30);
	ck_assert_uint_eq(cfg.ncpus, 4);
	ck_assert_str_eq(cfg.cmdline, "walk");
	ck_assert_str_eq(cfg.control_path, "/tmp/q.sock");
	ck_assert_int_eq(cfg.console, CONSOLE_FILE);
	ck_assert_str_eq(cfg.console_path, "/tmp/out.log");
	ck_assert_int_eq(cfg.backing, MM_BACKING_HUGETLB);
	ck_assert_int_eq(cfg.reserve_hugepages, 1);

	ck_assert_msg(RUN("--kernel", kernel, "--console", "none", "--mem", "64M") == 0, "%s", err);
	ck_assert_int_eq(cfg.console, CONSOLE_NONE);
	ck_assert_ptr_null(cfg.console_path);
	ck_assert_uint_eq(cfg.mem_size, 64ULL << 20);

	/* --initrd: any readable regular file (its format is the kernel's business). */
	ck_assert_msg(RUN("--kernel", kernel, "--initrd", kernel) == 0, "%s", err);
	ck_assert_str_eq(cfg.initrd, kernel);
}
END_TEST

START_TEST(cli_overrides_config)
{
	char xml[1024];
	const char *p;

	snprintf(xml, sizeof(xml),
		 "<domain type='kvm'><name>o</name><memory unit='MiB'>512</memory><vcpu>2</vcpu>\n"
		 "<memoryBacking><hugepages/></memoryBacking>"
		 "<os><type>hvm</type><kernel>k.elf</kernel><cmdline>from-xml</cmdline></os>\n"
		 "<devices><serial type='null'/></devices></domain>\n");
	p = write_xml("o.xml", xml);

	/* The file alone. */
	ck_assert_msg(RUN("--config", (char *)p) == 0, "%s", err);
	ck_assert_str_eq(cfg.name, "o");
	ck_assert_uint_eq(cfg.mem_size, 512ULL << 20);
	ck_assert_uint_eq(cfg.ncpus, 2);
	ck_assert_str_eq(cfg.cmdline, "from-xml");
	ck_assert_int_eq(cfg.console, CONSOLE_NONE);
	ck_assert_int_eq(cfg.backing, MM_BACKING_HUGETLB);

	/* Options win, wherever --config appears; the last of a repeat wins. */
	ck_assert_msg(RUN("--memory", "128M", "--cpus", "3", "--cpus", "5", "--cmdline", "cli",
			  "--console", "stdio", "--backing", "anon", "--config", (char *)p) == 0, "%s", err);
	ck_assert_str_eq(cfg.name, "o");
	ck_assert_uint_eq(cfg.mem_size, 128ULL << 20);
	ck_assert_uint_eq(cfg.ncpus, 5);
	ck_assert_str_eq(cfg.cmdline, "cli");
	ck_assert_int_eq(cfg.console, CONSOLE_STDIO);
	ck_assert_int_eq(cfg.backing, MM_BACKING_ANON);
	ck_assert_str_eq(cfg.kernel, kernel);

	/* A bad file is reported even if options would override its values. */
	p = write_xml("bad.xml", "<domain type='kvm'><memory>65536</memory>\n<disk/></domain>\n");
	ck_assert_int_eq(RUN("--config", (char *)p, "--kernel", kernel), -1);
	ck_assert_msg(strstr(err, "bad.xml:2: <disk> is not supported by mdvm") != NULL, "%s", err);
}
END_TEST

START_TEST(cli_default_config)
{
	/* Neither --config nor --kernel: ./configs/default.xml if it exists. */
	ck_assert_int_eq(chdir(tmpdir), 0);
	ck_assert_int_eq(RUN("--cpus", "2"), -1);
	ck_assert_str_eq(err, "no kernel: give --kernel ELF or --config FILE");

	ck_assert_int_eq(mkdir("configs", 0755), 0);
	write_file("configs/default.xml",
		   "<domain type='kvm'><name>d</name><memory unit='MiB'>64</memory>"
		   "<os><type>hvm</type><kernel>../k.elf</kernel></os></domain>\n");
	ck_assert_msg(RUN("--cpus", "2") == 0, "%s", err);
	ck_assert_str_eq(cfg.name, "d");
	ck_assert_str_eq(cfg.kernel, "configs/../k.elf");
	ck_assert_uint_eq(cfg.ncpus, 2);
	ck_assert_uint_eq(cfg.mem_size, 64ULL << 20);

	/* --kernel alone means the built-in defaults, not default.xml. */
	ck_assert_msg(RUN("--kernel", "k.elf") == 0, "%s", err);
	ck_assert_str_eq(cfg.name, "mdvm");
	ck_assert_uint_eq(cfg.mem_size, 256ULL << 20);
}
END_TEST

START_TEST(cli_errors)
{
	static const struct { const char *argv[6]; const char *msg; } t[] = {
		{ { "--foo" }, "unknown option '--foo' (see mdvm run --help)" },
		{ { "--foo=bar" }, "unknown option '--foo' (see mdvm run --help)" },
		{ { "-x" }, "unknown option '-x' (see mdvm run --help)" },
		{ { "--co", "x" }, "ambiguous option '--co': could be --config, --control, --console, --compaction" },
		{ { "--memory" }, "option '--memory' requires an argument" },
		{ { "--reserve-hugepages=yes" }, "option '--reserve-hugepages' takes no argument" },
		{ { "--kernel", "K", "extra" }, "unexpected argument 'extra' (see mdvm run --help)" },
		{ { "--config", "a.xml", "--config", "b.xml" }, "--config given more than once" },
		{ { "--kernel", "K", "--memory", "4X" },
		  "--memory: invalid size '4X': expected a number with an optional K/M/G/T suffix" },
		{ { "--kernel", "K", "--memory", "0" }, "--memory: invalid size '0': must be greater than zero" },
		{ { "--kernel", "K", "--memory", "1M" },
		  "--memory 1M: memory 1 MiB is below the minimum of 2 MiB" },
		{ { "--kernel", "K", "--memory", "5T" },
		  "--memory 5T: memory 5 TiB exceeds the maximum of 4 TiB" },
		{ { "--kernel", "K", "--memory", "4097K" },
		  "--memory 4097K: memory 4097 KiB is not a multiple of 4 KiB" },
		{ { "--kernel", "K", "--cpus", "0" }, "--cpus: invalid vCPU count '0': expected a number from 1 to 64" },
		{ { "--kernel", "K", "--cpus", "65" }, "--cpus: invalid vCPU count '65': expected a number from 1 to 64" },
		{ { "--kernel", "K", "--cpus", "-1" }, "--cpus: invalid vCPU count '-1': expected a number from 1 to 64" },
		{ { "--kernel", "K", "--cpus", "2x" }, "--cpus: invalid vCPU count '2x': expected a number from 1 to 64" },
		{ { "--kernel", "K", "--console", "tty" },
		  "invalid --console 'tty': expected stdio, file:PATH or none" },
		{ { "--kernel", "K", "--console", "file:" },
		  "invalid --console 'file:': expected stdio, file:PATH or none" },
		{ { "--kernel", "K", "--backing", "huge" },
		  "invalid --backing 'huge': expected auto, hugetlb, thp, memfd or anon" },
		{ { "--kernel", "" }, "--kernel: empty path" },
		{ { "--kernel", "K", "--control", "" }, "--control: empty path" },
		{ { "--kernel", "/nonexistent/vmlinux" }, "kernel '/nonexistent/vmlinux': No such file or directory" },
		{ { "--kernel", "/" }, "kernel '/': Is a directory" },
		{ { "--kernel", "K", "--initrd", "" }, "--initrd: empty path" },
		{ { "--kernel", "K", "--initrd", "/nonexistent/initrd" },
		  "initrd '/nonexistent/initrd': No such file or directory" },
		{ { "--kernel", "K", "--initrd", "/" }, "initrd '/': Is a directory" },
		{ { "--kernel", "K", "--console", "file:/nonexistent/c.log" },
		  "console file '/nonexistent/c.log': No such file or directory" },
		{ { "--kernel", "K", "--console", "file:/tmp" }, "console file '/tmp': Is a directory" },
		{ { "--config", "/nonexistent.xml" }, "/nonexistent.xml: No such file or directory" },
	};

	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		char *argv[8] = { "run" };
		int argc = 1;

		for (int j = 0; j < 6 && t[i].argv[j]; j++)
			argv[argc++] = !strcmp(t[i].argv[j], "K") ? kernel : (char *)t[i].argv[j];
		argv[argc] = NULL;
		ck_assert_msg(run_args(argv) == -1, "case %zu (%s %s) accepted", i, argv[1],
			      argc > 2 ? argv[2] : "");
		ck_assert_msg(strcmp(err, t[i].msg) == 0, "case %zu: got \"%s\"\nwant \"%s\"", i, err, t[i].msg);
	}
}
END_TEST

START_TEST(cli_cmdline_limit)
{
	static char long_cmd[4097];

	memset(long_cmd, 'x', 4095);
	long_cmd[4095] = '\0';
	ck_assert_msg(RUN("--kernel", kernel, "--cmdline", long_cmd) == 0, "%s", err);
	ck_assert_uint_eq(strlen(cfg.cmdline), 4095);
	long_cmd[4095] = 'x';
	long_cmd[4096] = '\0';
	ck_assert_int_eq(RUN("--kernel", kernel, "--cmdline", long_cmd), -1);
	ck_assert_str_eq(err, "--cmdline: cmdline is 4096 bytes; the limit is 4095");
}
END_TEST

START_TEST(cli_help_and_check)
{
	int ret;
	const char *out;

	/* --help wins over everything, even a missing config. */
	out = captured(&ret, (char *[]){ "run", "--config", "/nonexistent.xml", "--help", NULL });
	ck_assert_int_eq(ret, 1);
	ck_assert_msg(strstr(out, "Usage: mdvm run") && strstr(out, "--reserve-hugepages") &&
		      strstr(out, "--console KIND"), "%s", out);
	ck_assert_ptr_null(strstr(out, "check-config"));   /* hidden */
	out = captured(&ret, (char *[]){ "run", "-h", NULL });
	ck_assert_int_eq(ret, 1);

	out = captured(&ret, (char *[]){ "run", "--check-config", "--kernel", kernel, "--memory", "1G",
					 "--console", "file:/tmp/c.log", NULL });
	ck_assert_int_eq(ret, 2);
	ck_assert_msg(strstr(out, "name: mdvm\n") && strstr(out, "memory: 1 GiB (1073741824 bytes)\n") &&
		      strstr(out, "cpus: 1\n") && strstr(out, "console: file:/tmp/c.log\n") &&
		      strstr(out, "backing: auto\n") && strstr(out, "control: none\n"), "%s", out);

	/* Errors are still errors under --check-config. */
	ck_assert_int_eq(RUN("--check-config", "--kernel", "/nonexistent"), -1);
}
END_TEST

/* The balloon: on unless <memballoon model='none'/> or --balloon off, as
 * libvirt adds a virtio balloon when the domain names none. */
START_TEST(balloon_xml_and_cli)
{
	static const struct { const char *devices; int want; } c[] = {
		{ "", 1 },
		{ "<devices><memballoon model='virtio'/></devices>", 1 },
		{ "<devices><memballoon model='none'/></devices>", 0 },
	};
	char xml[512];
	const char *p;

	for (size_t i = 0; i < sizeof(c) / sizeof(c[0]); i++) {
		snprintf(xml, sizeof(xml), "<domain type='kvm'><name>b</name><memory unit='MiB'>64</memory>"
			 "<os><type>hvm</type><kernel>/k</kernel></os>%s</domain>\n", c[i].devices);
		p = write_xml("balloon.xml", xml);
		config_free(&cfg);
		config_init(&cfg);
		ck_assert_msg(config_load_xml(p, &cfg, err, sizeof(err)) == 0, "%s", err);
		ck_assert_int_eq(cfg.balloon, c[i].want);
	}
	p = write_xml("nob.xml", "<domain type='kvm'><name>b</name><memory unit='MiB'>64</memory>"
		      "<os><type>hvm</type><kernel>k.elf</kernel></os>"
		      "<devices><memballoon model='none'/></devices></domain>\n");
	ck_assert_msg(run_args((char *[]){ "run", "--config", (char *)p, "--balloon", "on", NULL }) == 0,
		      "%s", err);
	ck_assert_int_eq(cfg.balloon, 1);
	ck_assert_msg(run_args((char *[]){ "run", "--config", (char *)p, "--balloon=off", NULL }) == 0,
		      "%s", err);
	ck_assert_int_eq(cfg.balloon, 0);
	ck_assert_int_eq(run_args((char *[]){ "run", "--config", (char *)p, "--balloon", "yes", NULL }), -1);
	ck_assert_str_eq(err, "invalid --balloon 'yes': expected on or off");
	/* --compaction: off by default, auto runs the background compactor */
	ck_assert_int_eq(run_args((char *[]){ "run", "--config", (char *)p, "--compaction", "auto", NULL }), 0);
	ck_assert_int_eq(cfg.compaction, 1);
	ck_assert_int_eq(run_args((char *[]){ "run", "--config", (char *)p, "--compaction=off", NULL }), 0);
	ck_assert_int_eq(cfg.compaction, 0);
	ck_assert_int_eq(run_args((char *[]){ "run", "--config", (char *)p, "--compaction", "always", NULL }), -1);
	ck_assert_str_eq(err, "invalid --compaction 'always': expected auto or off");
}
END_TEST

START_TEST(cli_incoming)
{
	static const struct { const char *uri; const char *msg; } bad[] = {
		{ "tcp:127.0.0.1", "--incoming: 'tcp:127.0.0.1': expected tcp:HOST:PORT with a port in 1..65535" },
		{ "tcp:host:0", "--incoming: 'tcp:host:0': expected tcp:HOST:PORT with a port in 1..65535" },
		{ "tcp:host:70000", "--incoming: 'tcp:host:70000': expected tcp:HOST:PORT with a port in 1..65535" },
		{ "tcp:host:12x", "--incoming: 'tcp:host:12x': expected tcp:HOST:PORT with a port in 1..65535" },
		{ "unix:", "--incoming: 'unix:': unix: needs a socket path of 1..107 bytes" },
		{ "fd:3", "--incoming: 'fd:3': expected tcp:HOST:PORT or unix:PATH" },
	};
	ck_assert_msg(RUN("--kernel", kernel) == 0, "%s", err);
	ck_assert_ptr_null(cfg.incoming);
	ck_assert_msg(RUN("--kernel", kernel, "--incoming", "tcp:127.0.0.1:4444") == 0, "%s", err);
	ck_assert_str_eq(cfg.incoming, "tcp:127.0.0.1:4444");
	ck_assert_msg(RUN("--kernel", kernel, "--incoming", "tcp::4444") == 0, "%s", err);
	ck_assert_msg(RUN("--kernel", kernel, "--incoming", "unix:/tmp/m.sock") == 0, "%s", err);
	ck_assert_str_eq(cfg.incoming, "unix:/tmp/m.sock");
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ck_assert_int_eq(RUN("--kernel", kernel, "--incoming", (char *)bad[i].uri), -1);
		ck_assert_str_eq(err, bad[i].msg);
	}
}
END_TEST

Suite *config_suite(void)
{
	Suite *s = suite_create("config");
	TCase *tc = tcase_create("config");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, size_good);
	tcase_add_test(tc, size_bad);
	tcase_add_test(tc, defaults);
	tcase_add_test(tc, xml_full);
	tcase_add_test(tc, xml_minimal_and_mdvm_kernel);
	tcase_add_test(tc, xml_units);
	tcase_add_test(tc, xml_hugepages);
	tcase_add_test(tc, xml_consoles);
	tcase_add_test(tc, xml_repo_configs);
	tcase_add_test(tc, xml_rejections);
	tcase_add_test(tc, xml_rejections_domain);
	tcase_add_test(tc, xml_missing_file);
	tcase_add_test(tc, xml_cmdline_too_long);
	tcase_add_test(tc, cli_kernel_only);
	tcase_add_test(tc, cli_all_options);
	tcase_add_test(tc, cli_overrides_config);
	tcase_add_test(tc, cli_default_config);
	tcase_add_test(tc, cli_errors);
	tcase_add_test(tc, cli_cmdline_limit);
	tcase_add_test(tc, cli_help_and_check);
	tcase_add_test(tc, balloon_xml_and_cli);
	tcase_add_test(tc, cli_incoming);
	suite_add_tcase(s, tc);
	return s;
}
