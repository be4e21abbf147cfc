// Foundation names used by csrc/mps and ATen/mps (see ../README.md). Not Apple's header.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <dispatch/dispatch.h>

// The SDK's version macros (Availability.h): the macOS 15 SDK by default; -DTMF_STUB_MACOS_14_SDK checks the code
// as Xcode 15's macOS 14 SDK compiles it (no MTLMathMode).
#define __MAC_14_0 140000
#ifndef TMF_STUB_MACOS_14_SDK
#define __MAC_15_0 150000
#endif

typedef unsigned long NSUInteger;
typedef long NSInteger;
typedef bool BOOL;  // arm64 macOS
#ifndef nil
#define nil nullptr  // objc/objc.h (C++)
#endif
#define YES ((BOOL)1)
#define NO ((BOOL)0)
#define NS_ENUM(type, name) enum name : type name; enum name : type

@class NSString;

@protocol NSObject
- (instancetype)retain;
- (oneway void)release;
- (instancetype)autorelease;
@end

@interface NSObject <NSObject>
+ (instancetype)alloc;
+ (instancetype)new;
- (instancetype)init;
@end

@interface NSString : NSObject
+ (instancetype)stringWithUTF8String:(const char*)nullTerminatedCString;
@property(readonly) const char* UTF8String;
@end

@interface NSError : NSObject
@property(readonly, copy) NSString* localizedDescription;
@end

@interface NSDictionary : NSObject
@end
