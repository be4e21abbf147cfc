// libdispatch names used by csrc/mps and ATen/mps (see ../README.md). Not Apple's header.
#pragma once
#include <stddef.h>

typedef struct dispatch_queue_s* dispatch_queue_t;
typedef struct dispatch_data_s* dispatch_data_t;
typedef void (^dispatch_block_t)(void);
#define DISPATCH_DATA_DESTRUCTOR_DEFAULT NULL

#ifdef __cplusplus
extern "C" {
#endif
dispatch_data_t dispatch_data_create(const void* buffer, size_t size, dispatch_queue_t queue,
                                     dispatch_block_t destructor);
void dispatch_sync(dispatch_queue_t queue, dispatch_block_t block);
void dispatch_release(void* object);  // a function under manual retain/release; unavailable under ARC
#ifdef __cplusplus
}
#endif
