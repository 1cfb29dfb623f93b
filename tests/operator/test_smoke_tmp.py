def test_smoke(api, operator, kit):
    k=kit.k
    api.kube.create(kit.ICDS, kit.NS, kit.icd())
    rs = kit.wait_for(lambda: api.get(k.RAYSERVICES, "chat"), what="rayservice")
    st = kit.wait_for(lambda: api.get(kit.ICDS, "chat").get("status"), what="status")
    print(st)
    print([ (e['reason'], e['message']) for e in api.events()])
