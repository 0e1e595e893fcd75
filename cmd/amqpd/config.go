package main

// The config file and AMQPD_* environment variables, which set the daemon's flags, and
// -print-config, which writes the effective flags back out in the file's format.
//
// The file holds one "key = value" per line, keys named as the flags without the dash.
// Blank lines and lines starting with # are skipped. In a value without quotes, a # at its
// start or after a space or tab starts a comment that runs to the end of the line
// ("a#b" is a value, "a #b" is "a"). A value in double quotes is read as a Go string
// literal ("", "has #", "\t"), and may be followed by a comment. Spaces around the key
// and the value are dropped. A key may appear once. Everything else (a line without "=",
// an unknown key, a bad value) is an error naming the file and line; the messages never
// quote the file, so a secret in the wrong file does not reach a log.

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// envPrefix starts the environment variable of each flag: AMQPD_DATA_DIR is -data-dir.
const envPrefix = "AMQPD_"

// maxConfigFile bounds the config file.
const maxConfigFile = 1 << 20

// notInFile are the flags a config file cannot set. The environment may set -config
// (AMQPD_CONFIG), not -print-config.
var notInFile = map[string]bool{"config": true, "print-config": true}

// secretFlags are the flags -print-config shows only as set, so that its output may be
// shared or logged.
var secretFlags = map[string]bool{"cluster-secret": true}

// envName is the environment variable that sets flag name.
func envName(name string) string {
	return envPrefix + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
}

// loadConfig sets the flags of fs that the command line did not set: from the config file
// (-config, or AMQPD_CONFIG), and then from AMQPD_<FLAG> variables in environ, so the
// precedence is command line > environment > file > default. It returns the names of
// AMQPD_ variables that set no flag, for a warning: they may belong to another tool.
func loadConfig(fs *flag.FlagSet, environ []string) (unknownEnv []string, err error) {
	onCommandLine := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { onCommandLine[f.Name] = true })
	env := map[string]string{} // flag name to value
	for _, kv := range environ {
		k, v, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(k, envPrefix) || k == "AMQPD_USERNAME" || k == "AMQPD_PASSWORD" { // the API verbs'
			continue
		}
		name := strings.ToLower(strings.ReplaceAll(k[len(envPrefix):], "_", "-"))
		if f := fs.Lookup(name); f == nil || name == "print-config" || envName(name) != k {
			unknownEnv = append(unknownEnv, k)
			continue
		}
		if _, dup := env[name]; !dup { // the first, as os.Getenv
			env[name] = v
		}
	}
	file := fs.Lookup("config").Value.String()
	if v, ok := env["config"]; ok && !onCommandLine["config"] {
		file = v
	}
	if file != "" {
		if err := readConfigFile(fs, file, onCommandLine); err != nil {
			return nil, err
		}
	}
	fs.VisitAll(func(f *flag.Flag) {
		if v, ok := env[f.Name]; ok && !onCommandLine[f.Name] && err == nil {
			if e := setFlag(fs, f.Name, v); e != nil {
				err = fmt.Errorf("environment variable %s: %v", envName(f.Name), e)
			}
		}
	})
	if err != nil {
		return nil, err
	}
	return unknownEnv, nil
}

// readConfigFile sets the flags the file names, except those in skip.
func readConfigFile(fs *flag.FlagSet, file string, skip map[string]bool) error {
	f, err := os.Open(file)
	if err != nil {
		return fmt.Errorf("config file: %v", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxConfigFile+1))
	if err != nil {
		return fmt.Errorf("config file: %v", err)
	}
	if len(b) > maxConfigFile {
		return fmt.Errorf("%s: config file larger than %d bytes", file, maxConfigFile)
	}
	b = bytes.TrimPrefix(b, []byte("\uFEFF"))
	seen := map[string]int{} // key to line
	for i, line := range strings.Split(string(b), "\n") {
		n := i + 1
		fail := func(format string, a ...any) error {
			return fmt.Errorf("%s:%d: %s", file, n, fmt.Sprintf(format, a...))
		}
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		key, raw, ok := strings.Cut(line, "=")
		key = strings.TrimSpace(key)
		if !ok || key == "" {
			return fail("want key = value")
		}
		if notInFile[key] {
			return fail("%s cannot be set in a config file", key)
		}
		if fs.Lookup(key) == nil {
			if hint := likeFlag(fs, key); hint != "" {
				return fail("unknown key; did you mean %s?", hint)
			}
			return fail("unknown key (keys are the flag names, as in amqpd -print-config)")
		}
		value, err := configValue(raw)
		if err != nil {
			return fail("%s: %v", key, err)
		}
		if first, dup := seen[key]; dup {
			return fail("%s is already set on line %d", key, first)
		}
		seen[key] = n
		if skip[key] {
			continue
		}
		if err := setFlag(fs, key, value); err != nil {
			return fail("%v", err)
		}
	}
	return nil
}

// setFlag sets a flag, with an error that says what the flag wants.
func setFlag(fs *flag.FlagSet, name, value string) error {
	err := fs.Set(name, value)
	if err == nil {
		return nil
	}
	f := fs.Lookup(name)
	if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
		return fmt.Errorf("bad value for %s, want true or false: %v", name, err)
	}
	if kind, _ := flag.UnquoteUsage(f); kind != "" && kind != "string" {
		return fmt.Errorf("bad value for %s, want a %s: %v", name, kind, err)
	}
	return fmt.Errorf("bad value for %s: %v", name, err)
}

// configValue reads the value part of a line, after the "=".
func configValue(raw string) (string, error) {
	raw = strings.TrimSpace(raw)
	if strings.HasPrefix(raw, `"`) {
		quoted, err := strconv.QuotedPrefix(raw)
		if err != nil {
			return "", errors.New("unterminated or bad quoted value")
		}
		if rest := strings.TrimSpace(raw[len(quoted):]); rest != "" && rest[0] != '#' {
			return "", errors.New("text after the quoted value")
		}
		return strconv.Unquote(quoted)
	}
	for i := 0; i < len(raw); i++ {
		if raw[i] == '#' && (i == 0 || raw[i-1] == ' ' || raw[i-1] == '\t') {
			return strings.TrimSpace(raw[:i]), nil
		}
	}
	return raw, nil
}

// likeFlag returns the flag key may have meant (AMQPD_DATA_DIR, -data-dir, data_dir or
// Data-Dir for data-dir), or "". Only a flag name is returned, never key itself.
func likeFlag(fs *flag.FlagSet, key string) string {
	name := strings.ToLower(strings.TrimLeft(key, "-"))
	name = strings.ReplaceAll(strings.TrimPrefix(name, strings.ToLower(envPrefix)), "_", "-")
	if f := fs.Lookup(name); f != nil && !notInFile[name] {
		return f.Name
	}
	return ""
}

// writeConfig writes every flag of fs a config file may set, in the config file's
// format: read back as a config file, the output sets the same values.
func writeConfig(w io.Writer, fs *flag.FlagSet) error {
	var b strings.Builder
	b.WriteString("# amqpd configuration (amqpd -print-config)\n")
	fs.VisitAll(func(f *flag.Flag) {
		switch {
		case notInFile[f.Name]:
		case secretFlags[f.Name] && f.Value.String() != "":
			fmt.Fprintf(&b, "# %s is set; not printed\n", f.Name)
		default:
			fmt.Fprintf(&b, "%s = %s\n", f.Name, quoteValue(f.Value.String()))
		}
	})
	_, err := io.WriteString(w, b.String())
	return err
}

// quoteValue quotes v when it would not read back as itself without quotes.
func quoteValue(v string) string {
	if v == "" || strings.TrimSpace(v) != v || strings.ContainsAny(v, "#\"\\") || !strconv.CanBackquote(v) {
		return strconv.Quote(v)
	}
	return v
}
