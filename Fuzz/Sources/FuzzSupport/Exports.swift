// ByteReader (how every harness reads its input) comes from the test kit.
@_exported import XFRMTestKit
