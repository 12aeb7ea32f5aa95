# virtio-mmio and the balloon (docs/virtio.md). The virtqueue unit tests
# include devices/virtqueue.c directly.
$(B)/unit-tests $(B)/unit-tests-asan: devices/virtqueue.c devices/virtqueue.h
