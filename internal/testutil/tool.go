package testutil

import (
	"os"
	"os/exec"
	"testing"
)

// RequireToolsEnv names the environment variable that makes a missing
// tool a failure rather than a skip. .ci/run sets it after installing the
// tools, so that a test of a real tool (haproxy, promtool, spin, systemd's)
// cannot pass in CI by not running.
const RequireToolsEnv = "SOCKFSM_REQUIRE_TOOLS"

// Tool returns the path of the command name. When it is not installed,
// the test is skipped, saying which Debian package has it, or fails if
// RequireToolsEnv is set.
func Tool(t testing.TB, name, debianPackage string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	if os.Getenv(RequireToolsEnv) != "" {
		t.Fatalf("%s is not installed (Debian package %s), and %s is set: %v", name, debianPackage, RequireToolsEnv, err)
	}
	t.Skipf("%s is not installed (Debian package %s): %v", name, debianPackage, err)
	return ""
}
