// deploy-check checks dak's deployment files without a container engine or a
// Prometheus server, with the libraries those tools use themselves:
//
//	deploy-check compose FILE    # as `docker compose config`: compose-go loads the
//	                             # file, validates it against the Compose
//	                             # specification's JSON schema, interpolates
//	                             # variables and checks what refers to what
//	deploy-check rules FILE      # as `promtool check rules`: Prometheus's rulefmt
//	                             # parses the rule file, each expression and each
//	                             # annotation template
//	deploy-check dashboard FILE  # parses every PromQL query of a Grafana dashboard
//	                             # with Prometheus's parser, Grafana's variables
//	                             # ($__rate_interval, $job, ...) filled in
//
// It prints nothing when the file is valid, and why not otherwise (exit 1).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: deploy-check compose|rules|dashboard FILE")
		os.Exit(64)
	}
	file := os.Args[2]
	var err error
	switch os.Args[1] {
	case "compose":
		err = checkCompose(file)
	case "rules":
		err = checkRules(file)
	case "dashboard":
		err = checkDashboard(file)
	default:
		fmt.Fprintf(os.Stderr, "deploy-check: unknown check %q\n", os.Args[1])
		os.Exit(64)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "deploy-check %s %s: %v\n", os.Args[1], file, err)
		os.Exit(1)
	}
}

func checkCompose(file string) error {
	path, err := filepath.Abs(file)
	if err != nil {
		return err
	}
	options, err := cli.NewProjectOptions(
		[]string{path},
		cli.WithOsEnv,
		cli.WithDotEnv,
		cli.WithName("dak"),
	)
	if err != nil {
		return err
	}
	_, err = options.LoadProject(context.Background())
	return err
}

func promql() parser.Parser {
	return parser.NewParser(parser.Options{})
}

func checkRules(file string) error {
	groups, errs := rulefmt.ParseFile(file, false, model.UTF8Validation, promql(), nil)
	if len(errs) > 0 {
		return fmt.Errorf("%v", errs)
	}
	if len(groups.Groups) == 0 {
		return fmt.Errorf("no rule groups")
	}
	return nil
}

// Grafana's variables, as Prometheus would see them after Grafana filled
// them in.
var grafanaVariables = strings.NewReplacer(
	"$__rate_interval", "1m",
	"$__interval", "15s",
	"$__range", "1h",
	"$job", ".*",
)

func checkDashboard(file string) error {
	text, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	var dashboard struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(text, &dashboard); err != nil {
		return err
	}
	queries := 0
	var problems []string
	for _, panel := range dashboard.Panels {
		for _, target := range panel.Targets {
			queries++
			if _, err := promql().ParseExpr(grafanaVariables.Replace(target.Expr)); err != nil {
				problems = append(problems, fmt.Sprintf("panel %q: %s: %v", panel.Title, target.Expr, err))
			}
		}
	}
	if queries == 0 {
		return fmt.Errorf("no queries")
	}
	if len(problems) > 0 {
		return fmt.Errorf("\n  %s", strings.Join(problems, "\n  "))
	}
	return nil
}
