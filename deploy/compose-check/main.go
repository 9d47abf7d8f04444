// compose-check validates Compose files the way `docker compose config` does, without Docker:
// it uses compose-go, the loader Docker Compose itself is built on (schema validation,
// interpolation, extends/anchors, profiles). Used by the test suite on machines without a
// Docker Compose client.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: compose-check FILE [FILE...]")
		os.Exit(2)
	}
	for _, file := range os.Args[1:] {
		abs, err := filepath.Abs(file)
		if err != nil {
			fail(file, err)
		}
		opts, err := cli.NewProjectOptions(
			[]string{abs},
			cli.WithWorkingDirectory(filepath.Dir(abs)),
			cli.WithOsEnv,
			cli.WithDotEnv,
			cli.WithResolvedPaths(true),
			cli.WithProfiles([]string{"*"}),
		)
		if err != nil {
			fail(file, err)
		}
		project, err := opts.LoadProject(context.Background())
		if err != nil {
			fail(file, err)
		}
		fmt.Printf("%s: valid (%d services)\n", file, len(project.Services)+len(project.DisabledServices))
	}
}

func fail(file string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", file, err)
	os.Exit(1)
}
