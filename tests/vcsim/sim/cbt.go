// A changed block tracking (CBT) double over the simulator, which has none:
// it intercepts SOAP at the HTTP level.
//
//   - CreateSnapshot_Task: after the simulator made the snapshot, if the VM has
//     config.changeTrackingEnabled, each flat disk in snapshot.config gets a new
//     backing.changeId "<disk uuid>/<seq>", and the 64 KiB block fingerprints (CRC-64) of its
//     -flat.vmdk at that moment are kept under that change id.
//   - QueryChangedDiskAreas(snapshot, deviceKey, startOffset, changeId):
//     "*" gives the whole of a thick disk, the blocks of a thin one that are
//     not all zero (its allocated areas); a change id gives the blocks
//     whose hash differs between that change id's state and the snapshot's.
//     An unknown change id, or one of an earlier CBT life of the disk (CBT was
//     turned off since), is an InvalidArgument fault on changeId, as vSphere
//     answers. With -qcda-page, one answer covers at most that many bytes from
//     startOffset (vSphere also answers in pieces; callers page on
//     startOffset + length).
//   - ReconfigVM_Task leaving CBT off forgets the VM's disk uuids: change ids
//     taken before are no longer valid (a CBT reset).
package main

import (
	"bytes"
	"hash/crc64"
	"encoding/xml"
	"fmt"
	"io"
	"io/ioutil"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const blk = 64 * 1024

var qcdaPage int64

// A block's fingerprint: CRC-64 (ECMA), fast enough to scan gigabytes at
// snapshot time; the tests' writes are random data, never crafted collisions.
type epoch struct {
	hashes []uint64
	zero   []bool
}

var crcTable = crc64.MakeTable(crc64.ECMA)

var cbt = struct {
	sync.Mutex
	epochs map[string]*epoch           // changeId -> block state
	snaps  map[string]map[int32]string // snapshot moid -> deviceKey -> changeId
	uuids  map[string]string           // "<vm moid>/<deviceKey>" -> disk CBT uuid
	seq    int
}{epochs: map[string]*epoch{}, snaps: map[string]map[int32]string{}, uuids: map[string]string{}}

var reDsPath = regexp.MustCompile(`^\[([^\]]+)\]\s*(.*)$`)

func flatPath(fileName string) (string, error) {
	m := reDsPath.FindStringSubmatch(fileName)
	if m == nil {
		return "", fmt.Errorf("bad datastore path %q", fileName)
	}
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		if ds.Name == m[1] {
			return filepath.Join(datastoreDir(ds), strings.TrimSuffix(m[2], ".vmdk")+"-flat.vmdk"), nil
		}
	}
	return "", fmt.Errorf("datastore %q not found", m[1])
}

func diskCapacity(d *types.VirtualDisk) int64 {
	if d.CapacityInBytes > 0 {
		return d.CapacityInBytes
	}
	return d.CapacityInKB * 1024
}

func scan(path string, capacity int64) (*epoch, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	n := (capacity + blk - 1) / blk
	e := &epoch{hashes: make([]uint64, n), zero: make([]bool, n)}
	const chunk = 64 // blocks read at once (4 MiB)
	buf := make([]byte, chunk*blk)
	zero := make([]byte, blk)
	for first := int64(0); first < n; first += chunk {
		k, err := f.ReadAt(buf, first*blk)
		if err != nil && err != io.EOF {
			return nil, err
		}
		for j := k; j < len(buf); j++ {
			buf[j] = 0
		}
		for i := first; i < n && i < first+chunk; i++ {
			b := buf[(i-first)*blk : (i-first+1)*blk]
			e.hashes[i] = crc64.Checksum(b, crcTable)
			e.zero[i] = bytes.Equal(b, zero)
		}
	}
	return e, nil
}

var reThis = regexp.MustCompile(`<_this[^>]*>([^<]+)</_this>`)

func requestVM(reqBody []byte) *simulator.VirtualMachine {
	m := reThis.FindSubmatch(reqBody)
	if m == nil {
		return nil
	}
	ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: string(m[1])}
	vm, _ := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	return vm
}

func afterCreateSnapshot(reqBody []byte) {
	vm := requestVM(reqBody)
	if vm == nil || vm.Snapshot == nil || vm.Snapshot.CurrentSnapshot == nil {
		return
	}
	if vm.Config.ChangeTrackingEnabled == nil || !*vm.Config.ChangeTrackingEnabled {
		return
	}
	snap := simulator.Map.Get(*vm.Snapshot.CurrentSnapshot).(*simulator.VirtualMachineSnapshot)
	cbt.Lock()
	defer cbt.Unlock()
	if _, done := cbt.snaps[snap.Self.Value]; done {
		return
	}
	cbt.seq++
	ids := map[int32]string{}
	hw := snap.Config.Hardware
	devs := make([]types.BaseVirtualDevice, len(hw.Device))
	for i, d := range hw.Device {
		devs[i] = d
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		key := fmt.Sprintf("%s/%d", vm.Self.Value, disk.Key)
		if cbt.uuids[key] == "" {
			cbt.uuids[key] = uuid.New().String()
		}
		id := fmt.Sprintf("%s/%d", cbt.uuids[key], cbt.seq)
		p, err := flatPath(b.FileName)
		if err != nil {
			continue
		}
		e, err := scan(p, diskCapacity(disk))
		if err != nil {
			continue
		}
		cbt.epochs[id] = e
		ids[disk.Key] = id
		nd := *disk // a copy: the VM's live device list keeps no change id
		nb := *b
		nb.ChangeId = id
		nd.Backing = &nb
		devs[i] = &nd
	}
	snap.Config.Hardware.Device = devs
	cbt.snaps[snap.Self.Value] = ids
}

func afterReconfigure(reqBody []byte) {
	vm := requestVM(reqBody)
	if vm == nil || (vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled) {
		return
	}
	cbt.Lock()
	defer cbt.Unlock()
	for k := range cbt.uuids {
		if strings.HasPrefix(k, vm.Self.Value+"/") {
			delete(cbt.uuids, k)
		}
	}
}

type qcdaEnvelope struct {
	Body struct {
		Q *struct {
			This        string `xml:"_this"`
			Snapshot    string `xml:"snapshot"`
			DeviceKey   int32  `xml:"deviceKey"`
			StartOffset int64  `xml:"startOffset"`
			ChangeId    string `xml:"changeId"`
		} `xml:"QueryChangedDiskAreas"`
	} `xml:"Body"`
}

const envHead = `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>`
const envTail = `</soapenv:Body></soapenv:Envelope>`

func soapFault(w http.ResponseWriter, msg, faultType, inner string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprintf(w, `%s<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring><detail><%sFault xmlns="urn:vim25" xsi:type="%s">%s</%sFault></detail></soapenv:Fault>%s`,
		envHead, msg, faultType, faultType, inner, faultType, envTail)
}

func handleQCDA(w http.ResponseWriter, body []byte) {
	var env qcdaEnvelope
	if err := xml.Unmarshal(body, &env); err != nil || env.Body.Q == nil {
		soapFault(w, "cannot parse request", "InvalidRequest", "")
		return
	}
	q := env.Body.Q
	vm, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: q.This}).(*simulator.VirtualMachine)
	if !ok {
		soapFault(w, "vm not found", "ManagedObjectNotFound", "")
		return
	}
	var capacity int64 = -1
	thick := false
	for _, d := range vm.Config.Hardware.Device {
		if disk, ok := d.(*types.VirtualDisk); ok && disk.Key == q.DeviceKey {
			capacity = diskCapacity(disk)
			if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
				thick = b.ThinProvisioned == nil || !*b.ThinProvisioned
			}
		}
	}
	cbt.Lock()
	defer cbt.Unlock()
	cur := cbt.epochs[cbt.snaps[q.Snapshot][q.DeviceKey]]
	if capacity < 0 || cur == nil {
		soapFault(w, "The object or item referred to could not be found.", "NotFound", "")
		return
	}
	if q.StartOffset < 0 || q.StartOffset > capacity {
		soapFault(w, "A specified parameter was not correct: startOffset", "InvalidArgument", "<invalidProperty>startOffset</invalidProperty>")
		return
	}
	var base *epoch
	if q.ChangeId != "*" {
		base = cbt.epochs[q.ChangeId]
		life := strings.SplitN(cbt.snaps[q.Snapshot][q.DeviceKey], "/", 2)[0] + "/"
		if base == nil || !strings.HasPrefix(q.ChangeId, life) {
			soapFault(w, "A specified parameter was not correct: changeId", "InvalidArgument", "<invalidProperty>changeId</invalidProperty>")
			return
		}
	}
	end := capacity
	if qcdaPage > 0 && q.StartOffset+qcdaPage < end {
		end = q.StartOffset + qcdaPage
	}
	var areas strings.Builder
	var runStart int64 = -1
	flush := func(stop int64) {
		if runStart >= 0 {
			fmt.Fprintf(&areas, "<changedArea><start>%d</start><length>%d</length></changedArea>", runStart, stop-runStart)
			runStart = -1
		}
	}
	for i := range cur.hashes {
		off := int64(i) * blk
		stop := off + blk
		if stop > end {
			stop = end
		}
		if stop <= q.StartOffset || off >= end {
			continue
		}
		if off < q.StartOffset {
			off = q.StartOffset
		}
		var changed bool
		if base == nil {
			changed = thick || !cur.zero[i] // a thick disk is allocated whole
		} else {
			changed = i >= len(base.hashes) || base.hashes[i] != cur.hashes[i]
		}
		if changed && runStart < 0 {
			runStart = off
		} else if !changed {
			flush(off)
		}
	}
	flush(end)
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	fmt.Fprintf(w, `%s<QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval><startOffset>%d</startOffset><length>%d</length>%s</returnval></QueryChangedDiskAreasResponse>%s`,
		envHead, q.StartOffset, end-q.StartOffset, areas.String(), envTail)
}

// forward runs the simulator's own handler, then `after`, then answers.
func forward(next http.Handler, w http.ResponseWriter, r *http.Request, after func()) {
	rec := httptest.NewRecorder()
	next.ServeHTTP(rec, r)
	after()
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	w.Write(rec.Body.Bytes())
}

func wrapCBT(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/sdk" || r.Method != http.MethodPost {
			next.ServeHTTP(w, r)
			return
		}
		body, _ := ioutil.ReadAll(r.Body)
		r.Body = ioutil.NopCloser(bytes.NewReader(body))
		switch {
		case bytes.Contains(body, []byte("<QueryChangedDiskAreas")):
			handleQCDA(w, body)
		case bytes.Contains(body, []byte("<CreateSnapshot_Task")):
			if msg := takeSnapshotFault(); msg != "" {
				soapFault(w, msg, "SnapshotFault", "")
				return
			}
			forward(next, w, r, func() { afterCreateSnapshot(body) })
		case bytes.Contains(body, []byte("<ReconfigVM_Task")):
			forward(next, w, r, func() { afterReconfigure(body) })
		default:
			next.ServeHTTP(w, r)
		}
	})
}
