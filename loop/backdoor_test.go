package loop

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestNoBackdoor: the loop drives engines through sockfsm's exported API
// only. Being a package of its own, the compiler already keeps it from
// sockfsm's unexported fields and methods (the root package's
// TestDriverUsesPublicAPI does the same for the drivers inside it); what is
// left to check is that no production file of the package reaches past the
// compiler: no unsafe, no reflect, no go:linkname. Test files may (the
// footprint test measures sizes with unsafe.Sizeof).
//
// The same holds for the module's internal packages the loop imports, but
// one: internal/sockcall passes its buffers' addresses to recv(2) and
// send(2), which takes unsafe, as x/sys does. It may import nothing but
// unsafe, runtime and x/sys/unix, so it cannot reach into sockfsm either.
func TestNoBackdoor(t *testing.T) {
	if n := checkNoBackdoor(t, ".", nil); n < 5 {
		t.Fatalf("checked %d files: the check checks nothing", n)
	}
	internal := map[string]bool{}
	for _, imp := range productionImports(t, ".") {
		if rest, ok := strings.CutPrefix(imp, "github.com/sockfsm/sockfsm/internal/"); ok {
			internal[rest] = true
		}
	}
	if !internal["sockcall"] {
		t.Fatal("the loop no longer imports internal/sockcall: this test's exception is stale")
	}
	for pkg := range internal {
		dir := filepath.Join("..", "internal", pkg)
		if pkg != "sockcall" {
			checkNoBackdoor(t, dir, nil)
			continue
		}
		allowed := map[string]bool{"unsafe": true, "runtime": true, "golang.org/x/sys/unix": true}
		checkNoBackdoor(t, dir, allowed)
		for _, imp := range productionImports(t, dir) {
			if !allowed[imp] {
				t.Errorf("internal/sockcall imports %s: it may import only unsafe, runtime and x/sys/unix", imp)
			}
		}
	}
}

// productionFiles returns dir's Go files, tests left out, parsed for
// their imports and comments.
func productionFiles(t *testing.T, dir string) ([]*ast.File, *token.FileSet) {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	var files []*ast.File
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		// Every platform's files: the fallback too.
		f, err := parser.ParseFile(fset, name, nil, parser.ImportsOnly|parser.ParseComments)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	return files, fset
}

// productionImports returns the import paths of dir's production files.
func productionImports(t *testing.T, dir string) []string {
	t.Helper()
	files, _ := productionFiles(t, dir)
	var paths []string
	for _, f := range files {
		for _, imp := range f.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			paths = append(paths, path)
		}
	}
	return paths
}

// checkNoBackdoor reports dir's production files that import unsafe or
// reflect (unless allowed) or use go:linkname, and returns how many files
// it checked.
func checkNoBackdoor(t *testing.T, dir string, allowed map[string]bool) int {
	t.Helper()
	files, fset := productionFiles(t, dir)
	for _, f := range files {
		name := fset.Position(f.Package).Filename
		for _, imp := range f.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			if (path == "unsafe" || path == "reflect") && !allowed[path] {
				t.Errorf("%s imports %s", name, path)
			}
		}
		for _, cg := range f.Comments {
			for _, c := range cg.List {
				if strings.HasPrefix(c.Text, "//go:linkname") {
					t.Errorf("%s: %s", fset.Position(c.Pos()), c.Text)
				}
			}
		}
	}
	return len(files)
}
