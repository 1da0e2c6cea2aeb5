package loop

import (
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
func TestNoBackdoor(t *testing.T) {
	names, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	checked := 0
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		// Every platform's files: the fallback too.
		f, err := parser.ParseFile(fset, name, nil, parser.ImportsOnly|parser.ParseComments)
		if err != nil {
			t.Fatal(err)
		}
		checked++
		for _, imp := range f.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			switch path {
			case "unsafe", "reflect":
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
	if checked < 5 {
		t.Fatalf("checked %d files: the check checks nothing", checked)
	}
}
