/* Unit test runner: each test file in tests/unit defines `Suite *<name>_suite(void)`
 * at the start of a line; the Makefile collects them into suites.h as
 * SUITE(<name>_suite) lines. */
#include <check.h>
#include <stdlib.h>

#define SUITE(fn) Suite *fn(void);
#include "suites.h"
#undef SUITE

int main(void)
{
	SRunner *sr = srunner_create(NULL);
	int failed;

#define SUITE(fn) srunner_add_suite(sr, fn());
#include "suites.h"
#undef SUITE

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed != 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
