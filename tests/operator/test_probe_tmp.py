import threading, urllib.request, json, time
def test_probe(api, kit):
    api.kube.create(kit.ICDS, kit.NS, kit.icd())
    lines = []
    def watch():
        r = urllib.request.urlopen(api.url + "/apis/indexcache.io/v1alpha1/indexcachedeployments?watch=true", timeout=5)
        try:
            for line in r:
                lines.append(line[:150])
        except Exception as e:
            lines.append(repr(e))
    t = threading.Thread(target=watch, daemon=True); t.start()
    time.sleep(0.5)
    api.kube.patch(kit.ICDS, kit.NS, "chat", {"metadata": {"labels": {"a": "b"}}})
    time.sleep(0.5)
    print(lines)
