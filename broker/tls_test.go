package broker_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/virtkit/virtkit/broker"
)

// pki writes a CA, a server certificate for 127.0.0.1 and a client certificate into dir.
func pki(t *testing.T, dir string) (ca *x509.CertPool, serverCert tls.Certificate, files map[string]string) {
	t.Helper()
	key := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	caKey := key()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "virtkit test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	issue := func(name string, usage x509.ExtKeyUsage, ip bool) (certPEM, keyPEM []byte) {
		k := key()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{usage},
			KeyUsage: x509.KeyUsageDigitalSignature}
		if ip {
			tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kd, _ := x509.MarshalECPrivateKey(k)
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd})
	}
	files = map[string]string{}
	put := func(name string, data []byte) {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		files[name] = p
	}
	put("ca.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}))
	sc, sk := issue("nats", x509.ExtKeyUsageServerAuth, true)
	cc, ck := issue("virtkit-host", x509.ExtKeyUsageClientAuth, false)
	put("client.pem", cc)
	put("client-key.pem", ck)
	serverCert, err = tls.X509KeyPair(sc, sk)
	if err != nil {
		t.Fatal(err)
	}
	ca = x509.NewCertPool()
	ca.AddCert(caCert)
	return ca, serverCert, files
}

// The --nats path with TLS: a server that requires client certificates accepts a Config with
// tls_ca/tls_cert/tls_key and refuses one without the client certificate.
func TestConnectMutualTLS(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	ca, cert, files := pki(t, t.TempDir())
	opts := &server.Options{Host: "127.0.0.1", Port: server.RANDOM_PORT, NoSigs: true, NoLog: true,
		JetStream: true, StoreDir: t.TempDir(),
		TLS: true, TLSVerify: true, TLSTimeout: 5,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: ca, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}}
	ns, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("TLS server not ready")
	}
	url := "tls://" + ns.Addr().String()
	cfg := broker.Config{URL: url, TLSCA: files["ca.pem"], TLSCert: files["client.pem"], TLSKey: files["client-key.pem"], Host: "tls-host"}
	c, err := broker.Connect(ctx, cfg)
	if err != nil {
		t.Fatalf("mutual TLS: %v", err)
	}
	defer c.Close()
	if err := broker.Provision(ctx, c.JetStream(), broker.DefaultSchema(broker.SchemaOptions{})); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Publish(ctx, &broker.VMReady{VM: "over-tls"}); err != nil {
		t.Fatal(err)
	}
	// Without the client certificate the server refuses; without the CA the client refuses.
	noCert := broker.Config{URL: url, TLSCA: files["ca.pem"], Host: "x"}
	if c2, err := broker.Connect(ctx, noCert); err == nil {
		c2.Close()
		t.Error("connected without a client certificate")
	}
	noCA := broker.Config{URL: url, TLSCert: files["client.pem"], TLSKey: files["client-key.pem"], Host: "x"}
	if c3, err := broker.Connect(ctx, noCA); err == nil {
		c3.Close()
		t.Error("connected without trusting the server's CA")
	} else if !strings.Contains(err.Error(), "certificate") {
		t.Errorf("no CA: %v, want a certificate error", err)
	}
}
