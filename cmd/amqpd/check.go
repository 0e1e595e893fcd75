package main

import (
	"fmt"
	"io"

	amqp "github.com/maxpert/amqp-go"
)

// checkUsage is the usage line of "amqpd check".
const checkUsage = "usage: amqpd check DIR (the data directory of a stopped broker; nothing in it is changed)"

// runCheck runs "amqpd check DIR": it checks a stopped broker's data directory read-only
// and prints what it holds. The exit code is 0 when it is sound (a torn tail of the log,
// which the next start cuts off, and broken segment indexes, which it ignores, are
// sound), 1 on corruption, 2 for bad usage or a directory that cannot be checked (not a
// data directory, or in use by a running broker).
func runCheck(args []string, stdout, stderr io.Writer) int {
	if len(args) == 1 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
		fmt.Fprintln(stdout, checkUsage)
		return 0
	}
	if len(args) != 1 || len(args[0]) > 1 && args[0][0] == '-' {
		fmt.Fprintln(stderr, checkUsage)
		return 2
	}
	rep, err := amqp.CheckDataDir(args[0], stdout)
	if err != nil {
		fmt.Fprintf(stderr, "amqpd check: %v\n", err)
		return 2
	}
	if !rep.Sound() {
		return 1
	}
	return 0
}
