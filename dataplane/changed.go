package dataplane

import "k8s.io/apimachinery/pkg/types"

// ChangedSince returns the Services whose rules differ between prev and
// r, and true, when r was computed right after prev by the same Computer;
// otherwise false, and the caller must compare every Service.
func (r *Ruleset) ChangedSince(prev *Ruleset) ([]types.NamespacedName, bool) {
	if prev == nil || r.derivedFrom == 0 || r.derivedFrom != prev.generation {
		return nil, false
	}
	return r.changed, true
}
