// vCenter simulator for Sendense's tests: govmomi's simulator library (Debian's
// golang-github-vmware-govmomi-dev 0.24.2 ships it without a main) plus a CBT
// double (cbt.go) and fault injection (faults.go) that vcsim itself lacks.
//
// On start it prints one JSON line on stdout:
//
//	{"url": "https://127.0.0.1:PORT/sdk", "pid": N, "datastores": {"LocalDS_0": "/dir"}}
//
// and runs until SIGTERM/SIGINT, then removes its datastore folders.
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func main() {
	model := simulator.VPX()
	model.Machine = 1
	listen := flag.String("l", "127.0.0.1:0", "listen address (port 0: any free port)")
	user := flag.String("username", "", "login user (any if empty)")
	pass := flag.String("password", "", "login password (any if empty)")
	page := flag.Int64("qcda-page", 0, "QueryChangedDiskAreas answers at most this many bytes of the disk (0: to its end)")
	flag.IntVar(&model.Machine, "vm", model.Machine, "VMs per resource pool")
	flag.BoolVar(&simulator.Trace, "trace", false, "trace SOAP to stderr")
	flag.Parse()
	qcdaPage = *page

	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	u := &url.URL{Host: *listen}
	if *user != "" {
		u.User = url.UserPassword(*user, *pass)
	}
	model.Service.Listen = u
	model.Service.TLS = new(tls.Config)
	s := model.Service.NewServer()
	s.Config.Handler = wrapFaults(wrapCBT(s.Config.Handler))

	stores := map[string]string{}
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		stores[ds.Name] = datastoreDir(ds)
	}
	sdk := *s.URL
	sdk.User = nil
	out, _ := json.Marshal(map[string]interface{}{
		"url": sdk.String(), "pid": os.Getpid(), "datastores": stores,
	})
	os.Stdout.Write(append(out, '\n'))

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	s.Close()
	model.Remove()
}

func datastoreDir(ds *simulator.Datastore) string {
	if li, ok := ds.Info.(*types.LocalDatastoreInfo); ok && li.Path != "" {
		return li.Path
	}
	return ds.Info.GetDatastoreInfo().Url
}
