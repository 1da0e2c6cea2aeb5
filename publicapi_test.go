package sockfsm

import (
	"go/ast"
	"go/build"
	"go/importer"
	"go/parser"
	"go/token"
	"go/types"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// driverFiles are the files of this package that drive engines: they may
// use only what any driver outside the package can, the exported API of
// Engine and Conn.
var driverFiles = []string{"driver.go", "server.go", "listener.go", "netconn.go"}

// TestDriverUsesPublicAPI fails when a driver file touches an unexported
// field or method of Engine or Conn: the goroutine driver and Server are
// built on the same public API as an event loop of an embedder's own
// (issue "Open the engine"). It type-checks the package's production files
// from source.
func TestDriverUsesPublicAPI(t *testing.T) {
	if testing.Short() {
		t.Skip("type-checks the package from source")
	}
	fset := token.NewFileSet()
	names, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	var files []*ast.File
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		// The files the compiler sees on this platform.
		if ok, err := build.Default.MatchFile(".", name); err != nil || !ok {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	info := &types.Info{Selections: map[*ast.SelectorExpr]*types.Selection{}}
	conf := types.Config{Importer: importer.ForCompiler(fset, "source", nil)}
	pkg, err := conf.Check("github.com/sockfsm/sockfsm", fset, files, info)
	if err != nil {
		t.Fatal(err)
	}
	engine := pkg.Scope().Lookup("Engine").Type()
	conn := pkg.Scope().Lookup("Conn").Type()
	checked := 0
	for sel, s := range info.Selections {
		pos := fset.Position(sel.Pos())
		if !slices.Contains(driverFiles, filepath.Base(pos.Filename)) {
			continue
		}
		recv := s.Recv()
		if p, ok := recv.(*types.Pointer); ok {
			recv = p.Elem()
		}
		if !types.Identical(recv, engine) && !types.Identical(recv, conn) {
			continue
		}
		checked++
		if !s.Obj().Exported() {
			t.Errorf("%s: the driver uses %s.%s, which is not part of the public API", pos, recv, s.Obj().Name())
		}
	}
	if checked == 0 {
		t.Fatal("found no use of Engine in the driver files: the check checks nothing")
	}
}
