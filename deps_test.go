package amqp

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

const ownModule = "github.com/maxpert/amqp-go"

// depsGoTool finds the go command, preferring the toolchain that built this test.
func depsGoTool(t *testing.T) string {
	t.Helper()
	if root := runtime.GOROOT(); root != "" {
		if p, err := exec.LookPath(filepath.Join(root, "bin", "go")); err == nil {
			return p
		}
	}
	p, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not found")
	}
	return p
}

func depsGoList(t *testing.T, args ...string) []string {
	t.Helper()
	cmd := exec.Command(depsGoTool(t), append([]string{"list"}, args...)...)
	out, err := cmd.Output()
	if err != nil {
		msg := ""
		if ee, ok := err.(*exec.ExitError); ok {
			msg = string(ee.Stderr)
		}
		t.Fatalf("go list %s: %v\n%s", strings.Join(args, " "), err, msg)
	}
	return strings.Split(strings.TrimSpace(string(out)), "\n")
}

// TestStandardLibraryOnly checks that the broker and amqpd build from the standard library
// and this module alone; amqp091-go is for tests only.
func TestStandardLibraryOnly(t *testing.T) {
	t.Parallel()
	for _, p := range depsGoList(t, "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", ".", "./cmd/amqpd") {
		if p != "" && p != ownModule && !strings.HasPrefix(p, ownModule+"/") {
			t.Errorf("non-test code depends on %s, outside the standard library and %s", p, ownModule)
		}
	}
	for _, line := range depsGoList(t, "-f", "{{.ImportPath}} {{.Imports}}", "./...") {
		pkg, imports, _ := strings.Cut(line, " ")
		for _, imp := range strings.Fields(strings.Trim(imports, "[]")) {
			if strings.HasPrefix(imp, "github.com/rabbitmq/amqp091-go") {
				t.Errorf("non-test file of %s imports %s", pkg, imp)
			}
		}
	}
}
