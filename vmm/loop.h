/* The main event loop: one epoll on the main thread. vCPU threads hand work
 * to it with loop_call(). */
#ifndef MDVM_LOOP_H
#define MDVM_LOOP_H
#include <stdint.h>

typedef void (*loop_fd_fn)(void *opaque, uint32_t epoll_events);
typedef void (*loop_call_fn)(void *opaque);

int  loop_init(void);
int  loop_add_fd(int fd, uint32_t epoll_events, loop_fd_fn fn, void *opaque);
void loop_del_fd(int fd);
int  loop_mod_fd(int fd, uint32_t epoll_events);
/* Thread-safe: run fn(opaque) on the main loop thread soon. */
void loop_call(loop_call_fn fn, void *opaque);
/* One-shot timer on the main loop; returns an id > 0 for loop_cancel_timer. */
int  loop_add_timer(uint64_t ms, loop_call_fn fn, void *opaque);
void loop_cancel_timer(int id);
/* Runs until loop_quit(); returns the code given to it. */
int  loop_run(void);
void loop_quit(int code);   /* thread-safe */
#endif
