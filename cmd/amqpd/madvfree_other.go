//go:build !linux

package main

// useMadvFree does nothing here: MADV_FREE is the Linux runtime's choice to make.
func useMadvFree() {}
