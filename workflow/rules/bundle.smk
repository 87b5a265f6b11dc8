# The counted code of a run: results/<run>/code/train_gpt.py, the single file a submission ships (pgolf/bundle.py).
#
# The file embeds the whole resolved recipe, so its params are the whole recipe plus the hash of the pgolf sources:
# any knob or source change rebuilds it, and with it every artifact that counts its bytes (pack).

from pgolf.provenance import code_hash


rule bundle:
    output:
        code=code_file(),
    params:
        config=json.dumps(to_dict(CFG), sort_keys=True),
        code_hash=code_hash(),
    log:
        f"{RUN_DIR}/logs/bundle.log",
    shell:
        "pgolf bundle --config-json {params.config:q} --out {output.code} > {log} 2>&1"
