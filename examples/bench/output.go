//go:build linux

package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// baseName is the name of the report's files, without the extension.
func (r *report) baseName() string {
	if r.Mode == "sweep" {
		return "sweep"
	}
	return "results"
}

// write saves the Markdown, SVG and JSON into dir and returns their paths.
func (r *report) write(dir string) ([]string, error) {
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("JSON report: %w", err)
	}
	paths, err := r.writeViews(dir)
	if err != nil {
		return nil, err
	}
	p := filepath.Join(dir, r.baseName()+".json")
	if err := os.WriteFile(p, append(js, '\n'), 0o644); err != nil {
		return nil, err
	}
	return append(paths, p), nil
}

// writeViews saves the Markdown and the SVG chart into dir and returns
// their paths.
func (r *report) writeViews(dir string) ([]string, error) {
	svg, err := r.svg()
	if err != nil {
		return nil, fmt.Errorf("chart: %w", err)
	}
	md := filepath.Join(dir, r.baseName()+".md")
	if err := os.WriteFile(md, []byte(r.markdown()), 0o644); err != nil {
		return nil, err
	}
	chart := filepath.Join(dir, r.baseName()+".svg")
	if err := os.WriteFile(chart, svg, 0o644); err != nil {
		return nil, err
	}
	return []string{md, chart}, nil
}

// readReport reads a report written by write.
func readReport(path string) (*report, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	r := &report{}
	if err := json.Unmarshal(b, r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if r.Mode != "compare" && r.Mode != "sweep" {
		return nil, fmt.Errorf("%s: mode %q: want compare or sweep", path, r.Mode)
	}
	return r, nil
}

// renderDir redraws the Markdown and SVG of the reports in dir from their
// JSON, measuring nothing.
func renderDir(dir string) error {
	var wrote []string
	for _, name := range []string{"results.json", "sweep.json"} {
		r, err := readReport(filepath.Join(dir, name))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("-render: %w", err)
		}
		paths, err := r.writeViews(dir)
		if err != nil {
			return fmt.Errorf("-render: %w", err)
		}
		wrote = append(wrote, paths...)
	}
	if len(wrote) == 0 {
		return fmt.Errorf("-render %q: no results.json or sweep.json there", dir)
	}
	fmt.Printf("wrote %s\n", strings.Join(wrote, ", "))
	return nil
}
