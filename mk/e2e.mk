# End-to-end tests: stock Debian Linux under mdvm in a nested-SVM L1 under
# QEMU TCG (tests/e2e, docs/linux-guests.md). Downloads are cached in .e2e-cache/.
.PHONY: e2e
e2e: $(MDVM)
	/usr/bin/python3 -m pytest -q -rs -s tests/e2e
TEST_EXTRA += e2e
