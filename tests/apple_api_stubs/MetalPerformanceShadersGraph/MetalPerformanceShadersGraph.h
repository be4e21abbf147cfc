// MetalPerformanceShadersGraph names used by ATen/mps (see ../README.md). Not Apple's header.
#pragma once
#import <MetalPerformanceShaders/MetalPerformanceShaders.h>

@interface MPSGraph : NSObject
@end

@interface MPSGraphExecutionDescriptor : NSObject
@end

@interface MPSGraphCompilationDescriptor : NSObject
@end
