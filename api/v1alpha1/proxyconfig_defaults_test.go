package v1alpha1_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nftproxy/nftproxy/api/v1alpha1"
)

func TestDefaultFillsEveryField(t *testing.T) {
	var spec v1alpha1.ProxyConfigSpec
	spec.Default()
	if spec.MasqueradeBit == nil || *spec.MasqueradeBit != 14 {
		t.Errorf("masqueradeBit = %v, want 14", spec.MasqueradeBit)
	}
	if spec.MinSyncInterval == nil || spec.MinSyncInterval.Duration != time.Second {
		t.Errorf("minSyncInterval = %v, want 1s", spec.MinSyncInterval)
	}
	if spec.SyncInterval == nil || spec.SyncInterval.Duration != 30*time.Second {
		t.Errorf("syncInterval = %v, want 30s", spec.SyncInterval)
	}
	if spec.UDPConntrackCleanup == nil || !*spec.UDPConntrackCleanup {
		t.Errorf("udpConntrackCleanup = %v, want true", spec.UDPConntrackCleanup)
	}
	if spec.LocalTrafficDetection == nil || spec.LocalTrafficDetection.Mode != v1alpha1.DetectLocalByClusterCIDR {
		t.Errorf("localTrafficDetection = %+v, want mode ClusterCIDR", spec.LocalTrafficDetection)
	}
	if err := spec.Validate(); err != nil {
		t.Errorf("defaults do not validate: %v", err)
	}
}

func TestDefaultKeepsSetFields(t *testing.T) {
	bit, cleanup := int32(0), false
	spec := v1alpha1.ProxyConfigSpec{
		MasqueradeBit:       &bit,
		MinSyncInterval:     &metav1.Duration{},
		UDPConntrackCleanup: &cleanup,
	}
	spec.Default()
	if *spec.MasqueradeBit != 0 || spec.MinSyncInterval.Duration != 0 || *spec.UDPConntrackCleanup {
		t.Errorf("Default overwrote explicit zero values: %+v", spec)
	}
}

func TestValidateAcceptsGoodSpecs(t *testing.T) {
	for _, raw := range []string{
		`{}`,
		`{"clusterCIDRs": ["10.244.0.0/16", "fd00:10:244::/56"], "masqueradeBit": 0, "minSyncInterval": "0s"}`,
		`{"clusterCIDRs": ["fd00:10:244::/56"], "masqueradeBit": 31, "syncInterval": "24h", "minSyncInterval": "5m"}`,
		`{"nodePortAddresses": ["127.0.0.0/8", "::1/128", "0.0.0.0/0"], "allowedExternalIPCIDRs": ["203.0.113.0/24"]}`,
		`{"localTrafficDetection": {"mode": "InterfaceNamePrefix", "interfaceNamePrefix": "veth"}}`,
		`{"localTrafficDetection": {"mode": "NodeCIDR"}}`,
	} {
		var spec v1alpha1.ProxyConfigSpec
		if err := json.Unmarshal([]byte(raw), &spec); err != nil {
			t.Fatalf("%s: %v", raw, err)
		}
		spec.Default()
		if err := spec.Validate(); err != nil {
			t.Errorf("%s: unexpected error: %v", raw, err)
		}
	}
}

func TestValidateRejectsBadSpecsNamingTheField(t *testing.T) {
	for _, tc := range invalidSpecs {
		t.Run(tc.name, func(t *testing.T) {
			var spec v1alpha1.ProxyConfigSpec
			if err := json.Unmarshal([]byte(tc.spec), &spec); err != nil {
				t.Skipf("%s cannot reach Validate: decoding fails with %v", tc.spec, err)
			}
			spec.Default()
			err := spec.Validate()
			if err == nil {
				t.Fatalf("Validate accepted %s", tc.spec)
			}
			if !strings.Contains(err.Error(), tc.field+":") {
				t.Errorf("error does not name %s: %v", tc.field, err)
			}
		})
	}
}

func TestValidateReportsEveryProblem(t *testing.T) {
	bit := int32(40)
	spec := v1alpha1.ProxyConfigSpec{
		ClusterCIDRs:  []v1alpha1.CIDR{"bad"},
		MasqueradeBit: &bit,
		SyncInterval:  &metav1.Duration{},
	}
	spec.Default()
	err := spec.Validate()
	for _, field := range []string{"spec.clusterCIDRs[0]", "spec.masqueradeBit", "spec.syncInterval"} {
		if err == nil || !strings.Contains(err.Error(), field) {
			t.Errorf("error does not name %s: %v", field, err)
		}
	}
}
