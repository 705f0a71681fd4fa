//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
)

// nginxInfo is an nginx binary with the stream module.
type nginxInfo struct {
	path    string
	version string
	module  string // the dynamic stream module to load, or "" when built in
}

var (
	nginxVersionRe = regexp.MustCompile(`nginx version: (\S+)`)
	streamRe       = regexp.MustCompile(`--with-stream(=dynamic)?(\s|$)`)
	modulesPathRe  = regexp.MustCompile(`--modules-path=(\S+)`)
	prefixRe       = regexp.MustCompile(`--prefix=(\S+)`)
)

// detectNginx finds bin and its stream module.
func detectNginx(ctx context.Context, bin string) (*nginxInfo, error) {
	if bin == "" || bin == "off" {
		return nil, errors.New("disabled by -nginx")
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil, fmt.Errorf("-nginx %q: no nginx binary (Debian/Ubuntu: apt-get install -y nginx libnginx-mod-stream)", bin)
	}
	out, _ := exec.CommandContext(ctx, path, "-V").CombinedOutput()
	info, err := parseNginxV(string(out), fileExists)
	if err != nil {
		return nil, err
	}
	info.path = path
	return info, nil
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

// parseNginxV reads the output of `nginx -V`: the version and where the
// stream module is.
func parseNginxV(v string, exists func(string) bool) (*nginxInfo, error) {
	info := &nginxInfo{version: "nginx"}
	if m := nginxVersionRe.FindStringSubmatch(v); m != nil {
		info.version = m[1]
	}
	m := streamRe.FindStringSubmatch(v)
	if m == nil {
		return nil, fmt.Errorf("%s has no stream module (--with-stream)", info.version)
	}
	if m[1] == "" {
		return info, nil // built in
	}
	var dirs []string
	if p := modulesPathRe.FindStringSubmatch(v); p != nil {
		dirs = append(dirs, p[1])
	}
	if p := prefixRe.FindStringSubmatch(v); p != nil {
		dirs = append(dirs, filepath.Join(p[1], "modules"))
	}
	dirs = append(dirs, "/usr/lib/nginx/modules", "/usr/lib64/nginx/modules", "/usr/share/nginx/modules", "/usr/local/nginx/modules")
	for _, d := range dirs {
		if p := filepath.Join(d, "ngx_stream_module.so"); exists(p) {
			info.module = p
			return info, nil
		}
	}
	return nil, fmt.Errorf("%s has a dynamic stream module but ngx_stream_module.so is not installed (Debian/Ubuntu: apt-get install -y libnginx-mod-stream)", info.version)
}

// nginxConfig is a minimal nginx.conf: in the foreground, with its files
// in dir, one UDP stream server on listen that round-robins over upstreams
// and expects one reply per datagram.
func nginxConfig(dir, listen string, upstreams []string, workers, module string) string {
	var sb strings.Builder
	if module != "" {
		fmt.Fprintf(&sb, "load_module %s;\n", module)
	}
	fmt.Fprintf(&sb, "daemon off;\nmaster_process on;\nworker_processes %s;\n", workers)
	fmt.Fprintf(&sb, "pid %s;\nerror_log %s error;\n", filepath.Join(dir, "nginx.pid"), filepath.Join(dir, "error.log"))
	sb.WriteString("worker_rlimit_nofile 65536;\nevents {\n\tworker_connections 16384;\n}\n")
	sb.WriteString("stream {\n\tupstream bench {\n")
	for _, u := range upstreams {
		fmt.Fprintf(&sb, "\t\tserver %s;\n", u)
	}
	sb.WriteString("\t}\n\tserver {\n")
	fmt.Fprintf(&sb, "\t\tlisten %s udp reuseport;\n", listen)
	sb.WriteString("\t\tproxy_pass bench;\n\t\tproxy_responses 1;\n\t\tproxy_timeout 10s;\n\t}\n}\n")
	return sb.String()
}
