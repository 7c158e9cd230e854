package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestParseFlagsDefaults(t *testing.T) {
	t.Setenv("NODE_NAME", "node-a")
	opts, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if opts.nodeName != "node-a" || opts.configName != "default" || opts.kubeconfig != "" {
		t.Errorf("defaults = %+v", opts)
	}
	if opts.healthProbeAddress != ":10256" || opts.metricsAddress != "127.0.0.1:10249" {
		t.Errorf("default addresses = %q, %q", opts.healthProbeAddress, opts.metricsAddress)
	}
}

func TestParseFlagsHostnameWhenNoNodeName(t *testing.T) {
	t.Setenv("NODE_NAME", "")
	opts, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if opts.nodeName == "" || opts.nodeName != strings.ToLower(opts.nodeName) {
		t.Errorf("node name from the hostname = %q", opts.nodeName)
	}
}

func TestParseFlagsOverrides(t *testing.T) {
	opts, err := parseFlags([]string{"--node-name=n1", "--config-name=edge", "--kubeconfig=/k", "--metrics-bind-address=0"})
	if err != nil {
		t.Fatal(err)
	}
	if opts.nodeName != "n1" || opts.configName != "edge" || opts.kubeconfig != "/k" || opts.metricsAddress != "0" {
		t.Errorf("parsed %+v", opts)
	}
}

func TestParseFlagsRejectsBadInput(t *testing.T) {
	for _, args := range [][]string{{"--config-name="}, {"--node-name="}, {"--nope"}, {"--node-name=a", "extra"}} {
		if _, err := parseFlags(args); err == nil {
			t.Errorf("parseFlags(%q) accepted", args)
		}
	}
}

func TestRunVersion(t *testing.T) {
	for _, args := range [][]string{{"version"}, {"--version"}} {
		var out bytes.Buffer
		if err := run(args, &out); err != nil || !strings.HasPrefix(out.String(), "nftproxy ") {
			t.Errorf("run(%q) = %v, %q", args, err, out.String())
		}
	}
	if err := run([]string{"frobnicate"}, &bytes.Buffer{}); err == nil {
		t.Error("unknown command accepted")
	}
}
