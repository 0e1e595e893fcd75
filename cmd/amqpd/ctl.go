package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"strings"

	amqp "github.com/maxpert/amqp-go"
)

// ctlCommand describes a subcommand that edits a definitions file.
type ctlCommand struct {
	args     string // positional arguments, for messages
	min, max int    // how many positional arguments
	vhost    bool   // takes -p VHOST
	password bool   // reads a password from standard input
	policy   bool   // takes --priority and --apply-to
}

// ctlCommands are the definitions subcommands, named as rabbitmqctl names them.
var ctlCommands = map[string]ctlCommand{
	"add_user":          {args: "NAME", min: 1, max: 1, password: true},
	"delete_user":       {args: "NAME", min: 1, max: 1},
	"change_password":   {args: "NAME", min: 1, max: 1, password: true},
	"list_users":        {},
	"set_user_tags":     {args: "NAME [TAG...]", min: 1, max: -1},
	"add_vhost":         {args: "NAME", min: 1, max: 1},
	"delete_vhost":      {args: "NAME", min: 1, max: 1},
	"list_vhosts":       {},
	"set_permissions":   {args: "USER CONF WRITE READ", min: 4, max: 4, vhost: true},
	"clear_permissions": {args: "USER", min: 1, max: 1, vhost: true},
	"list_permissions":  {vhost: true},

	"set_policy":             {args: "NAME PATTERN DEFINITION", min: 3, max: 3, vhost: true, policy: true},
	"clear_policy":           {args: "NAME", min: 1, max: 1, vhost: true},
	"list_policies":          {vhost: true},
	"set_operator_policy":    {args: "NAME PATTERN DEFINITION", min: 3, max: 3, vhost: true, policy: true},
	"clear_operator_policy":  {args: "NAME", min: 1, max: 1, vhost: true},
	"list_operator_policies": {vhost: true},
}

// maxPasswordLine bounds the password read from standard input.
const maxPasswordLine = 64 << 10

// isCtlVerb reports whether s names a definitions subcommand.
func isCtlVerb(s string) bool {
	_, ok := ctlCommands[s]
	return ok
}

// runCtl runs a definitions subcommand and returns the exit code: 0 on success, 1 when
// the file cannot be read or changed, 2 for bad usage. A missing file starts from
// RabbitMQ's defaults (guest and "/"). Flags and arguments may come in any order; "--"
// ends the flags. Passwords are read from stdin only, never from arguments.
func runCtl(verb string, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	cmd, ok := ctlCommands[verb]
	if !ok {
		fmt.Fprintf(stderr, "amqpd: unknown command %q\n", verb)
		return 2
	}
	fail := func(code int, format string, a ...any) int {
		fmt.Fprintf(stderr, "amqpd %s: %s\n", verb, fmt.Sprintf(format, a...))
		return code
	}
	flags := flag.NewFlagSet(verb, flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	file := flags.String("definitions", "definitions.json", "definitions file to edit")
	vhost := "/"
	usage := "usage: amqpd " + verb + " [-definitions FILE]"
	if cmd.vhost {
		flags.StringVar(&vhost, "p", "/", "virtual host")
		flags.StringVar(&vhost, "vhost", "/", "virtual host")
		usage += " [-p VHOST]"
	}
	priority, applyTo := 0, "all"
	if cmd.policy {
		flags.IntVar(&priority, "priority", 0, "policy priority")
		flags.StringVar(&applyTo, "apply-to", "all", "what the policy applies to")
		usage += " [--priority N] [--apply-to all|queues|exchanges]"
	}
	if cmd.args != "" {
		usage += " " + cmd.args
	}
	if cmd.password {
		usage += " < PASSWORD-FILE"
	}
	pos, err := parseInterspersed(flags, args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(stdout, usage)
		return 0
	}
	if err != nil {
		return fail(2, "%v", err)
	}
	if n := len(pos); n < cmd.min || cmd.max >= 0 && n > cmd.max {
		return fail(2, "got %d arguments; %s", n, usage)
	}

	var password string
	if cmd.password {
		if password, err = readPassword(stdin); err != nil {
			return fail(1, "%v", err)
		}
	}
	d, err := amqp.LoadDefinitions(*file)
	if errors.Is(err, fs.ErrNotExist) {
		d, err = amqp.DefaultDefinitions(), nil
	}
	if err != nil {
		return fail(1, "%s", strings.TrimPrefix(err.Error(), "amqp: "))
	}

	switch verb {
	case "list_users":
		fmt.Fprintln(stdout, "user\ttags")
		for _, u := range d.Users {
			fmt.Fprintf(stdout, "%s\t[%s]\n", u.Name, strings.Join(u.Tags, ", "))
		}
		return 0
	case "list_vhosts":
		fmt.Fprintln(stdout, "name")
		for _, v := range d.Vhosts {
			fmt.Fprintln(stdout, v.Name)
		}
		return 0
	case "list_permissions":
		fmt.Fprintln(stdout, "user\tconfigure\twrite\tread")
		for _, p := range d.Permissions {
			if p.Vhost == vhost {
				fmt.Fprintf(stdout, "%s\t%s\t%s\t%s\n", p.User, p.Configure, p.Write, p.Read)
			}
		}
		return 0
	case "list_policies", "list_operator_policies":
		list := d.Policies
		if verb == "list_operator_policies" {
			list = d.OperatorPolicies
		}
		ps, err := list()
		if err != nil {
			return fail(1, "%s", strings.TrimPrefix(err.Error(), "amqp: "))
		}
		fmt.Fprintln(stdout, "vhost\tname\tpattern\tapply-to\tdefinition\tpriority")
		for _, p := range ps {
			if p.Vhost == vhost {
				fmt.Fprintf(stdout, "%s\t%s\t%s\t%s\t%s\t%d\n", p.Vhost, p.Name, p.Pattern, p.ApplyTo, p.Definition, p.Priority)
			}
		}
		return 0
	case "set_policy":
		err = d.SetPolicy(amqp.Policy{Vhost: vhost, Name: pos[0], Pattern: pos[1], Definition: []byte(pos[2]), Priority: priority, ApplyTo: applyTo})
	case "set_operator_policy":
		err = d.SetOperatorPolicy(amqp.Policy{Vhost: vhost, Name: pos[0], Pattern: pos[1], Definition: []byte(pos[2]), Priority: priority, ApplyTo: applyTo})
	case "clear_policy":
		err = d.ClearPolicy(vhost, pos[0])
	case "clear_operator_policy":
		err = d.ClearOperatorPolicy(vhost, pos[0])
	case "add_user":
		err = d.AddUser(pos[0], password)
	case "delete_user":
		err = d.DeleteUser(pos[0])
	case "change_password":
		err = d.ChangePassword(pos[0], password)
	case "set_user_tags":
		err = d.SetUserTags(pos[0], pos[1:]...)
	case "add_vhost":
		err = d.AddVhost(pos[0])
	case "delete_vhost":
		err = d.DeleteVhost(pos[0])
	case "set_permissions":
		err = d.SetPermissions(pos[0], vhost, pos[1], pos[2], pos[3])
	case "clear_permissions":
		err = d.ClearPermissions(pos[0], vhost)
	}
	if err == nil {
		err = d.Save(*file)
	}
	if err != nil {
		return fail(1, "%s", strings.TrimPrefix(err.Error(), "amqp: "))
	}
	return 0
}

// parseInterspersed parses flags that may come before, between or after the positional
// arguments, which it returns in order. Everything after "--" is positional.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if used := len(args) - len(rest); used > 0 && args[used-1] == "--" && !isFlagValue(fs, args[:used-1]) {
			return append(pos, rest...), nil
		}
		if len(rest) == 0 {
			return pos, nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// isFlagValue reports whether the argument after parsed is the value of a flag: the
// last of parsed is a flag of fs, given without "=", that takes a value.
func isFlagValue(fs *flag.FlagSet, parsed []string) bool {
	if len(parsed) == 0 {
		return false
	}
	name := strings.TrimLeft(parsed[len(parsed)-1], "-")
	if !strings.HasPrefix(parsed[len(parsed)-1], "-") || strings.Contains(name, "=") {
		return false
	}
	f := fs.Lookup(name)
	if f == nil {
		return false
	}
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return !ok || !b.IsBoolFlag()
}

// readPassword reads the first line of r without its line ending (LF or CRLF).
func readPassword(r io.Reader) (string, error) {
	if r == nil {
		return "", errors.New("no password on standard input")
	}
	line, err := bufio.NewReader(io.LimitReader(r, maxPasswordLine+2)).ReadString('\n')
	if err != nil && err != io.EOF {
		return "", fmt.Errorf("reading the password from standard input: %v", err)
	}
	line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
	switch {
	case line == "":
		return "", errors.New("no password on standard input: give it as the first line")
	case len(line) > maxPasswordLine:
		return "", errors.New("the password on standard input is too long")
	}
	return line, nil
}
