// MetalPerformanceShaders names used by ATen/mps (see ../README.md). Not Apple's header.
#pragma once
#import <Metal/Metal.h>

@interface MPSCommandBuffer : NSObject <MTLCommandBuffer>
@end
