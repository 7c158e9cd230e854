// Command nftproxy is the node agent of nftproxy, a Kubernetes service proxy
// that programs nftables maps and verdict maps over netlink.
//
//	nftproxy [flags]   run the agent (the default)
//	nftproxy version   print the version and exit
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
	"github.com/nftproxy/nftproxy/dataplane"
	"github.com/nftproxy/nftproxy/internal/agent"
	"github.com/nftproxy/nftproxy/internal/version"
)

// options are the agent's command-line settings. Everything a cluster admin
// tunes at run time lives in the ProxyConfig instead.
type options struct {
	kubeconfig              string
	nodeName                string
	configName              string
	metricsAddress          string
	metricsSecure           bool
	healthProbeAddress      string
	pprofAddress            string
	leaderElect             bool
	leaderElectionNamespace string
	netns                   string
	printVersion            bool
	zap                     zap.Options
}

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "nftproxy:", err)
		os.Exit(1)
	}
}

// run dispatches to a subcommand; with none it runs the agent until SIGTERM
// or SIGINT.
func run(args []string, stdout io.Writer) error {
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		switch args[0] {
		case "version":
			_, err := fmt.Fprintln(stdout, version.String())
			return err
		case "cleanup":
			return cleanup(args[1:], stdout)
		default:
			return fmt.Errorf("unknown command %q (commands: version, cleanup; run with no command to start the agent)", args[0])
		}
	}
	opts, err := parseFlags(args)
	if err != nil {
		return err
	}
	if opts.printVersion {
		_, err := fmt.Fprintln(stdout, version.String())
		return err
	}
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&opts.zap)))
	return runAgent(ctrl.SetupSignalHandler(), opts)
}

// cleanup deletes nftproxy's table, and nothing else, then exits.
func cleanup(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("nftproxy cleanup", flag.ContinueOnError)
	netns := fs.String("netns", "", "Path of the network namespace to clean instead of the current one.")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var kopts []dataplane.KernelOption
	if *netns != "" {
		kopts = append(kopts, dataplane.WithNetNS(*netns))
	}
	k, err := dataplane.NewKernelApplier(kopts...)
	if err != nil {
		return fmt.Errorf("opening nftables: %w", err)
	}
	defer func() { _ = k.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := k.Cleanup(ctx); err != nil {
		return fmt.Errorf("deleting table inet %s: %w", dataplane.TableName, err)
	}
	_, err = fmt.Fprintf(stdout, "Deleted table inet %s (if it existed); nothing else was touched.\n", dataplane.TableName)
	return err
}

// parseFlags reads the agent's flags.
func parseFlags(args []string) (options, error) {
	var opts options
	fs := flag.NewFlagSet("nftproxy", flag.ContinueOnError)
	fs.StringVar(&opts.kubeconfig, "kubeconfig", "",
		"Path of a kubeconfig; without it, $KUBECONFIG, then the in-cluster ServiceAccount, then ~/.kube/config.")
	fs.StringVar(&opts.nodeName, "node-name", defaultNodeName(),
		"Name of the Node this agent programs; $NODE_NAME, else the hostname, by default.")
	fs.StringVar(&opts.configName, "config-name", "default",
		"Name of the cluster-scoped ProxyConfig this agent follows; defaults apply while it does not exist.")
	fs.StringVar(&opts.metricsAddress, "metrics-bind-address", "127.0.0.1:10249",
		"Address of the Prometheus metrics endpoint; \"0\" turns it off.")
	fs.BoolVar(&opts.metricsSecure, "metrics-secure", false,
		"Serve metrics over HTTPS to clients the API server authenticates and authorizes (GET on the /metrics non-resource URL).")
	fs.StringVar(&opts.pprofAddress, "pprof-bind-address", "0",
		"Address of Go's /debug/pprof profiles (for debugging; keep it on loopback); \"0\" turns it off.")
	fs.StringVar(&opts.healthProbeAddress, "health-probe-bind-address", ":10256",
		"Address of the /healthz and /readyz endpoints; \"0\" turns them off.")
	fs.BoolVar(&opts.leaderElect, "leader-elect", true,
		"Elect one agent per ProxyConfig to write its status and the Services' Events.")
	fs.StringVar(&opts.leaderElectionNamespace, "leader-election-namespace", defaultNamespace(),
		"Namespace of the leader election Lease and of the agents' node reports (Leases); $POD_NAMESPACE, else nftproxy-system, by default.")
	fs.StringVar(&opts.netns, "netns", "",
		"Program the network namespace at this path (e.g. /run/netns/node-a) instead of the agent's own; for tests and demos.")
	fs.BoolVar(&opts.printVersion, "version", false, "Print the version and exit.")
	opts.zap.BindFlags(fs)
	if err := fs.Parse(args); err != nil {
		return opts, err
	}
	if fs.NArg() > 0 {
		return opts, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if opts.nodeName == "" {
		return opts, errors.New("--node-name is empty and neither $NODE_NAME nor the hostname gives one")
	}
	if opts.configName == "" {
		return opts, errors.New("--config-name must not be empty")
	}
	return opts, nil
}

func defaultNodeName() string {
	if name := os.Getenv("NODE_NAME"); name != "" {
		return name
	}
	name, _ := os.Hostname()
	return strings.ToLower(name)
}

func defaultNamespace() string {
	if ns := os.Getenv("POD_NAMESPACE"); ns != "" {
		return ns
	}
	return "nftproxy-system"
}

// loadRESTConfig reads the kubeconfig at path, or finds one as kubectl and
// in-cluster clients do when path is empty.
func loadRESTConfig(path string) (*rest.Config, error) {
	if path != "" {
		return clientcmd.BuildConfigFromFlags("", path)
	}
	return ctrl.GetConfig()
}

// runAgent runs the agent until ctx ends. The node's rules stay in the
// kernel when it returns, so a restart does not cut traffic.
func runAgent(ctx context.Context, opts options) error {
	logger := ctrl.Log.WithName("setup")
	logger.Info("Starting nftproxy", "version", version.String(), "node", opts.nodeName, "proxyConfig", opts.configName)

	restConfig, err := loadRESTConfig(opts.kubeconfig)
	if err != nil {
		return fmt.Errorf("loading kubeconfig: %w", err)
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}
	if err := proxyv1alpha1.AddToScheme(scheme); err != nil {
		return err
	}
	a, err := agent.New(ctx, agent.Options{
		RESTConfig:              restConfig,
		Scheme:                  scheme,
		NodeName:                opts.nodeName,
		ConfigName:              opts.configName,
		MetricsAddress:          opts.metricsAddress,
		MetricsSecure:           opts.metricsSecure,
		HealthProbeAddress:      opts.healthProbeAddress,
		PprofAddress:            opts.pprofAddress,
		LeaderElection:          opts.leaderElect,
		LeaderElectionNamespace: opts.leaderElectionNamespace,
		StatusNamespace:         opts.leaderElectionNamespace,
		NetNS:                   opts.netns,
	})
	if err != nil {
		return err
	}
	if err := a.Start(ctx); err != nil {
		return fmt.Errorf("running the agent: %w", err)
	}
	logger.Info("Stopped; the node's rules stay in place")
	return nil
}
