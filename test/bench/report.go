package main

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// The report: Markdown tables, a verdict per aim, and an SVG chart.
// Nothing here asserts anything: figures on a shared machine vary, so the
// aims are reported as met or missed, never enforced.

// percentile is the nearest-rank percentile p (0..100) of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func ms(d time.Duration) string {
	switch {
	case d >= 10*time.Second:
		return fmt.Sprintf("%.1f s", d.Seconds())
	case d >= time.Second:
		return fmt.Sprintf("%.2f s", d.Seconds())
	default:
		return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
	}
}

func us(d time.Duration) string { return fmt.Sprintf("%.0f", float64(d)/float64(time.Microsecond)) }

func mib(b int) string { return fmt.Sprintf("%.2f MiB", float64(b)/(1<<20)) }

func scaleName(n int) string {
	if n >= 1000 && n%1000 == 0 {
		return fmt.Sprintf("%dk", n/1000)
	}
	return fmt.Sprint(n)
}

// median batch of a change kind.
func medianBatch(bs []batch) batch {
	if len(bs) == 0 {
		return batch{}
	}
	s := slices.Clone(bs)
	slices.SortFunc(s, func(a, b batch) int { return a.Bytes - b.Bytes })
	return s[len(s)/2]
}

// markdown renders the results.
func (res *results) markdown(chart string) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	m := res.Machine
	w("Machine: %d CPUs (%s), kernel %s, %d MiB RAM, %s. Run took %s.\n\n",
		m.CPUs, m.CPUModel, m.Kernel, m.MemoryMB, m.Go, res.Took.Round(time.Second))

	w("#### Cold start: empty kernel to every sampled ClusterIP answering\n\n")
	w("Each Service: one TCP port, %d ready endpoints. Times from the agent's process start.\n\n", endpointsPerService)
	w("| Services | cold start | first ClusterIP answers | /readyz | caches synced (log) | first write done (log) | its compute+write (log) | replay: list | replay: compute | replay: write | netlink batch | agent CPU |\n")
	w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, s := range res.Scales {
		// The agent's gauge holds its last write only: read after the
		// cold start it can already show the (empty) sync that followed;
		// the replayed Replace writes the same batch.
		cold := s.ColdBatch
		if cold.Messages == 0 {
			cold = s.InProcess.Batch
		}
		w("| %s | **%s** | %s | %s | %s | %s | %s | %s | %s | %s | %d msgs, %s | %.2f s |\n",
			scaleName(s.Services), ms(s.ColdStart), ms(s.ColdFirstAnswer), ms(s.Ready),
			ms(s.Timeline.CachesSynced), ms(s.Timeline.FirstWrite), ms(s.Timeline.FirstSync),
			ms(s.InProcess.List), ms(s.InProcess.Compute), ms(s.InProcess.Write),
			cold.Messages, mib(cold.Bytes), s.ColdCPUSeconds)
	}
	w("\n")

	w("#### Change latency: API write returned to the change visible in traffic\n\n")
	w("p50 / **p99** from the write returning; in brackets, p99 from the request being sent.\n\n")
	w("| Services | new Service | endpoint added | endpoint removed | changes per kind | netlink batch per change (median) |\n")
	w("|---:|---:|---:|---:|---:|---|\n")
	for _, s := range res.Scales {
		if len(s.Changes) == 0 {
			continue
		}
		w("| %s ", scaleName(s.Services))
		var counts, batches []string
		for _, k := range changeKinds {
			c := s.Changes[k]
			w("| %s / **%s** (%s) ", ms(percentile(c.Latencies, 50)), ms(percentile(c.Latencies, 99)), ms(percentile(c.FromRequest, 99)))
			n := fmt.Sprint(len(c.Latencies))
			if c.Failed > 0 {
				n += fmt.Sprintf(" (+%d never visible)", c.Failed)
			}
			counts = append(counts, n)
			mb := medianBatch(c.Batches)
			batches = append(batches, fmt.Sprintf("%s: %d msgs, %.1f KiB", k, mb.Messages, float64(mb.Bytes)/1024))
		}
		w("| %s | %s |\n", strings.Join(counts, " / "), strings.Join(batches, "; "))
	}
	w("\n")

	w("#### Datapath: one new TCP connection (connect, request, answer, close), client ns → node ns → pod, µs\n\n")
	w("| Services | ClusterIP p50 / p90 / p99 | pod IP p50 / p90 / p99 | ClusterIP over pod IP (p50) | connections per path |\n")
	w("|---:|---:|---:|---:|---:|\n")
	for _, s := range res.Scales {
		c50, d50 := percentile(s.ClusterIP, 50), percentile(s.Direct, 50)
		w("| %s | %s / %s / %s | %s / %s / %s | %+.1f%% | %d |\n", scaleName(s.Services),
			us(c50), us(percentile(s.ClusterIP, 90)), us(percentile(s.ClusterIP, 99)),
			us(d50), us(percentile(s.Direct, 90)), us(percentile(s.Direct, 99)),
			100*(float64(c50)/float64(d50)-1), len(s.ClusterIP))
	}
	w("\n")

	w("#### Agent resources (whole run at each scale)\n\n")
	w("Busy after cold start: from every sampled ClusterIP answering until the agent had nothing pending and had neither written nor used CPU for a window of minSyncInterval + 200 ms (the window included).\n\n")
	w("| Services | peak RSS (VmHWM) | CPU at cold start | CPU total | busy after cold start | API objects written for this scale |\n")
	w("|---:|---:|---:|---:|---:|---:|\n")
	for _, s := range res.Scales {
		rate := ""
		if s.CreatedObjects > 0 {
			rate = fmt.Sprintf("%d in %s (%.0f/s)", s.CreatedObjects, ms(s.CreateTook), float64(s.CreatedObjects)/s.CreateTook.Seconds())
		}
		busy := "not measured"
		if len(s.Changes) > 0 {
			busy = ms(s.SettleAfterColdStart)
		}
		w("| %s | %.0f MiB | %.2f s | %.2f s | %s | %s |\n", scaleName(s.Services),
			float64(s.Usage.PeakRSSBytes)/(1<<20), s.ColdCPUSeconds, s.Usage.CPUSeconds, busy, rate)
	}
	w("\n")

	w("#### Aims\n\n| Aim | Measured | |\n|---|---|---|\n")
	for _, a := range res.aims() {
		w("| %s | %s | %s |\n", a.name, a.measured, a.verdict)
	}
	if chart != "" {
		w("\n![nftproxy benchmark](%s)\n", chart)
	}
	return b.String()
}

type aim struct{ name, measured, verdict string }

func (res *results) scale(n int) *scaleResult {
	for i := range res.Scales {
		if res.Scales[i].Services == n && !res.Scales[i].Baseline {
			return &res.Scales[i]
		}
	}
	for i := range res.Scales {
		if res.Scales[i].Services == n {
			return &res.Scales[i]
		}
	}
	return nil
}

func verdict(ok bool) string {
	if ok {
		return "**pass**"
	}
	return "**miss**"
}

// aims judges the results against the project's aims; an aim whose scale
// was not run says so.
func (res *results) aims() []aim {
	var out []aim
	notRun := func(name string, n int) aim {
		return aim{name, fmt.Sprintf("%s Services not run", scaleName(n)), "not measured"}
	}
	for _, c := range []struct {
		n   int
		max time.Duration
	}{{10000, 2 * time.Second}, {50000, 10 * time.Second}} {
		name := fmt.Sprintf("cold start at %s < %s", scaleName(c.n), c.max)
		if s := res.scale(c.n); s != nil {
			out = append(out, aim{name, ms(s.ColdStart), verdict(s.ColdStart < c.max)})
		} else {
			out = append(out, notRun(name, c.n))
		}
	}
	name := "one change at 50k visible within 20 ms p99"
	if s := res.scale(50000); s != nil && len(s.Changes) > 0 {
		var parts []string
		ok := true
		for _, k := range changeKinds {
			c := s.Changes[k]
			p99 := percentile(c.Latencies, 99)
			ok = ok && c.Failed == 0 && len(c.Latencies) > 0 && p99 <= 20*time.Millisecond
			parts = append(parts, fmt.Sprintf("%s %s", k, ms(p99)))
		}
		out = append(out, aim{name, strings.Join(parts, ", "), verdict(ok)})
	} else {
		out = append(out, notRun(name, 50000))
	}
	big, small := res.scale(50000), res.scale(100)
	name = "datapath at 50k within 5% of 100 Services (ClusterIP p50)"
	if big != nil && small != nil {
		d := float64(percentile(big.ClusterIP, 50))/float64(percentile(small.ClusterIP, 50)) - 1
		out = append(out, aim{name, fmt.Sprintf("%s vs %s µs (%+.1f%%)", us(percentile(big.ClusterIP, 50)), us(percentile(small.ClusterIP, 50)), 100*d), verdict(d <= 0.05)})
	} else {
		out = append(out, aim{name, "50k or 100 Services not run", "not measured"})
	}
	name = "datapath at 50k within 15% of direct to pod (p50)"
	if big != nil {
		d := float64(percentile(big.ClusterIP, 50))/float64(percentile(big.Direct, 50)) - 1
		out = append(out, aim{name, fmt.Sprintf("%s vs %s µs (%+.1f%%)", us(percentile(big.ClusterIP, 50)), us(percentile(big.Direct, 50)), 100*d), verdict(d <= 0.15)})
	} else {
		out = append(out, notRun(name, 50000))
	}
	name = "peak RSS at 50k < 150 MB"
	if big != nil {
		mb := float64(big.Usage.PeakRSSBytes) / 1e6
		out = append(out, aim{name, fmt.Sprintf("%.0f MB", mb), verdict(mb < 150)})
	} else {
		out = append(out, notRun(name, 50000))
	}
	return out
}

// The chart: three panels of grouped bars, by hand, on a log scale
// where the figures span decades.

type series struct {
	name   string
	color  string
	values []float64 // per category; NaN when not measured
}

type aimMark struct {
	category int // -1: across the whole panel
	value    float64
	label    string
}

func (res *results) svg() string {
	var cats []string
	for _, s := range res.Scales {
		cats = append(cats, scaleName(s.Services))
	}
	n := len(res.Scales)
	vals := func(f func(s *scaleResult) float64) []float64 {
		out := make([]float64, n)
		for i := range res.Scales {
			out[i] = f(&res.Scales[i])
		}
		return out
	}
	const width, panelH = 860, 300
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", width, 3*panelH+20)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")

	var aims []aimMark
	for i, s := range res.Scales {
		switch s.Services {
		case 10000:
			aims = append(aims, aimMark{i, 2, "aim 2 s"})
		case 50000:
			aims = append(aims, aimMark{i, 10, "aim 10 s"})
		}
	}
	panel(&b, 0, width, panelH, "Cold start: agent start to every sampled ClusterIP answering (s, log scale)", cats,
		[]series{
			{"caches synced (list)", "#9ecae1", vals(func(s *scaleResult) float64 { return s.Timeline.CachesSynced.Seconds() })},
			{"first write done", "#4292c6", vals(func(s *scaleResult) float64 { return s.Timeline.FirstWrite.Seconds() })},
			{"all sampled ClusterIPs answer", "#08519c", vals(func(s *scaleResult) float64 { return s.ColdStart.Seconds() })},
		}, aims)

	changeVal := func(kind string) func(s *scaleResult) float64 {
		return func(s *scaleResult) float64 {
			c := s.Changes[kind]
			if c == nil || len(c.Latencies) == 0 {
				return math.NaN()
			}
			return float64(percentile(c.Latencies, 99)) / float64(time.Millisecond)
		}
	}
	panel(&b, panelH, width, panelH, "Change latency p99: API write to visible in traffic (ms, log scale)", cats,
		[]series{
			{kindNewService, "#fd8d3c", vals(changeVal(kindNewService))},
			{kindEndpointAdded, "#e6550d", vals(changeVal(kindEndpointAdded))},
			{kindEndpointRemoved, "#a63603", vals(changeVal(kindEndpointRemoved))},
		}, []aimMark{{-1, 20, "aim 20 ms"}})

	usVal := func(f func(s *scaleResult) []time.Duration, p float64) func(s *scaleResult) float64 {
		return func(s *scaleResult) float64 { return float64(percentile(f(s), p)) / float64(time.Microsecond) }
	}
	clusterIP := func(s *scaleResult) []time.Duration { return s.ClusterIP }
	direct := func(s *scaleResult) []time.Duration { return s.Direct }
	panel(&b, 2*panelH, width, panelH, "New connection latency (µs, log scale)", cats,
		[]series{
			{"ClusterIP p50", "#74c476", vals(usVal(clusterIP, 50))},
			{"pod IP p50", "#bdbdbd", vals(usVal(direct, 50))},
			{"ClusterIP p99", "#238b45", vals(usVal(clusterIP, 99))},
			{"pod IP p99", "#636363", vals(usVal(direct, 99))},
		}, nil)
	b.WriteString("</svg>\n")
	return b.String()
}

// panel draws one grouped bar chart with a log y axis at vertical offset
// top.
func panel(b *strings.Builder, top, width, height int, title string, cats []string, ss []series, aims []aimMark) {
	const left, right, titleH, bottom = 70, 190, 30, 40
	plotW, plotH := width-left-right, height-titleH-bottom
	y0 := top + titleH
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, s := range ss {
		for _, v := range s.values {
			if v > 0 && !math.IsNaN(v) {
				lo, hi = math.Min(lo, v), math.Max(hi, v)
			}
		}
	}
	for _, a := range aims {
		lo, hi = math.Min(lo, a.value), math.Max(hi, a.value)
	}
	if math.IsInf(lo, 0) {
		lo, hi = 1, 10
	}
	lo = math.Pow(10, math.Floor(math.Log10(lo)))
	hi = math.Pow(10, math.Ceil(math.Log10(hi*1.01)))
	ypos := func(v float64) float64 {
		return float64(y0+plotH) - (math.Log10(v)-math.Log10(lo))/(math.Log10(hi)-math.Log10(lo))*float64(plotH)
	}
	fmt.Fprintf(b, `<text x="%d" y="%d" font-size="14" font-weight="bold">%s</text>`+"\n", left, top+20, esc(title))
	for d := lo; d <= hi*1.001; d *= 10 {
		y := ypos(d)
		fmt.Fprintf(b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", left, left+plotW, y, y)
		fmt.Fprintf(b, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", left-6, y+4, trimFloat(d))
	}
	fmt.Fprintf(b, `<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="black"/>`+"\n", left, left+plotW, y0+plotH, y0+plotH)
	groupW := float64(plotW) / float64(max(len(cats), 1))
	barW := groupW * 0.8 / float64(max(len(ss), 1))
	for ci, cat := range cats {
		gx := float64(left) + groupW*float64(ci)
		fmt.Fprintf(b, `<text x="%.1f" y="%d" text-anchor="middle">%s Services</text>`+"\n", gx+groupW/2, y0+plotH+18, esc(cat))
		for si, s := range ss {
			v := s.values[ci]
			if math.IsNaN(v) || v <= 0 {
				continue
			}
			x := gx + groupW*0.1 + barW*float64(si)
			y := ypos(v)
			fmt.Fprintf(b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s: %s</title></rect>`+"\n",
				x, y, barW-1, float64(y0+plotH)-y, s.color, esc(s.name), trimFloat(v))
		}
	}
	for _, a := range aims {
		x1, x2 := float64(left), float64(left+plotW)
		if a.category >= 0 {
			x1 = float64(left) + groupW*float64(a.category)
			x2 = x1 + groupW
		}
		y := ypos(a.value)
		fmt.Fprintf(b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#d62728" stroke-width="2" stroke-dasharray="6 3"/>`+"\n", x1, x2, y, y)
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" fill="#d62728" text-anchor="end">%s</text>`+"\n", x2-2, y-4, esc(a.label))
	}
	for si, s := range ss {
		ly := y0 + 10 + si*18
		fmt.Fprintf(b, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/>`+"\n", left+plotW+14, ly, s.color)
		fmt.Fprintf(b, `<text x="%d" y="%d">%s</text>`+"\n", left+plotW+32, ly+10, esc(s.name))
	}
}

func trimFloat(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 1:
		return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.2f", v), "0"), ".")
	default:
		return strings.TrimRight(strings.TrimRight(fmt.Sprintf("%.4f", v), "0"), ".")
	}
}

func esc(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
}
