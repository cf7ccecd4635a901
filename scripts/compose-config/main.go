// compose-config loads a Compose file the way `docker compose config` does,
// with the Compose specification's own loader (compose-go): it interpolates
// variables, validates the file against the specification's JSON schema and
// checks what refers to what (depends_on, volumes, networks, configs). It
// prints the resolved file, or why the file is refused and exits 1. It needs
// no container engine.
//
//	go run . -f ../../deploy/compose.yaml
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	file := flag.String("f", "compose.yaml", "the Compose file")
	quiet := flag.Bool("q", false, "print nothing when the file is valid")
	flag.Parse()

	path, err := filepath.Abs(*file)
	if err != nil {
		fail(err)
	}
	options, err := cli.NewProjectOptions(
		[]string{path},
		cli.WithOsEnv,
		cli.WithDotEnv,
		cli.WithName("dak"),
	)
	if err != nil {
		fail(err)
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		fail(err)
	}
	if *quiet {
		return
	}
	out, err := project.MarshalYAML()
	if err != nil {
		fail(err)
	}
	os.Stdout.Write(out)
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "compose-config: %v\n", err)
	os.Exit(1)
}
