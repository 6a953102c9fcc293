//! The greedy search: prefix reuse is exact, cheap, resumable, and a layer whose attention
//! output is zero costs nothing to flip.

use indexcache_config::{IndexSchedule, ModelConfig};
use indexcache_model::{DsaModel, ModelError, RandomSource, WeightSource};
use indexcache_ops::cpu::CpuBackend;
use indexcache_tools::data::Window;
use indexcache_tools::search::{SearchOptions, SearchState, Target, greedy_search, schedule_loss};

const CONFIG: &str = r#"{
  "model_type": "glm_moe_dsa", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
  "moe_intermediate_size": 16, "num_hidden_layers": 8, "num_attention_heads": 2, "num_key_value_heads": 2,
  "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
  "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
  "index_n_heads": 8, "index_head_dim": 16, "index_topk": 4, "max_position_embeddings": 64,
  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}
}"#;

/// Random weights, with one layer's attention output projection set to zero.
struct ZeroOProj {
    inner: RandomSource,
    layer: Option<usize>,
}

impl WeightSource for ZeroOProj {
    fn has(&self, name: &str) -> bool {
        self.inner.has(name)
    }
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let v = self.inner.get(name, shape)?;
        match self.layer {
            Some(l) if name == format!("model.layers.{l}.self_attn.o_proj.weight") => Ok(vec![0.0; v.len()]),
            _ => Ok(v.into_iter().map(|x| x * 3.0).collect()),
        }
    }
}

fn model(zero_layer: Option<usize>) -> DsaModel<CpuBackend> {
    let cfg = ModelConfig::from_json_str(CONFIG, "test config").unwrap();
    let sched = IndexSchedule::all_full(cfg.num_hidden_layers);
    let mut src = ZeroOProj { inner: RandomSource::new(7), layer: zero_layer };
    DsaModel::from_source(cfg, CpuBackend::new(), sched, &mut src, indexcache_model::IndexerSelection::All).unwrap()
}

fn windows() -> Vec<Window> {
    let mut s = 12345u64;
    (0..2)
        .map(|_| Window {
            ids: (0..24)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((s >> 33) % 96) as u32
                })
                .collect(),
            score_from: 1,
        })
        .collect()
}

fn search(m: &DsaModel<CpuBackend>, opts: &SearchOptions, resume: Option<SearchState>) -> SearchState {
    let w = windows();
    greedy_search(m, &w, opts, "fp".into(), resume, &mut |_| Ok(()), &mut |_| {}).unwrap()
}

#[test]
fn flipping_a_layer_with_zero_attention_output_changes_nothing() {
    let m = model(Some(3));
    let w = windows();
    let all = IndexSchedule::all_full(8);
    let base = schedule_loss(&m, &all, &w).unwrap();
    let flipped = schedule_loss(&m, &all.with_shared(3).unwrap(), &w).unwrap();
    assert_eq!(base, flipped, "exactly zero change");
    // And the search sees it: layer 3's first-step candidate loss equals the all-Full loss.
    let st = search(&m, &SearchOptions { target: Target::Flips(1), blocks: 1 }, None);
    let c3 = st.steps[0].candidates.iter().find(|c| c.0 == 3).unwrap().1;
    assert_eq!(c3, st.all_full_loss);
    // Other layers do change the loss (the test is not vacuous).
    assert!(st.steps[0].candidates.iter().any(|c| c.0 != 3 && c.1 != st.all_full_loss));
}

#[test]
fn prefix_reuse_is_exact_and_cheap_over_a_full_sweep() {
    let m = model(None);
    let w = windows();
    let st = search(&m, &SearchOptions { target: Target::Flips(7), blocks: 1 }, None);
    assert_eq!(st.removal_order.len(), 7);
    assert_eq!(st.pattern, "FSSSSSSS");
    // Every candidate loss equals a from-scratch evaluation of that schedule, bit for bit, and
    // the committed flip is the lowest (ties → lower layer).
    let mut sched = IndexSchedule::all_full(8);
    for step in &st.steps {
        for &(l, loss) in &step.candidates {
            let naive = schedule_loss(&m, &sched.with_shared(l).unwrap(), &w).unwrap();
            assert_eq!(loss, naive, "step {} candidate {l}", step.step);
        }
        let best = step.candidates.iter().min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0))).unwrap();
        assert_eq!(best.0, step.flipped);
        sched = sched.with_shared(step.flipped).unwrap();
        assert_eq!(step.loss, schedule_loss(&m, &sched, &w).unwrap());
    }
    let ratio = st.layer_evals as f64 / st.naive_layer_evals as f64;
    eprintln!("layer evals {} vs naive {} ({ratio:.3})", st.layer_evals, st.naive_layer_evals);
    assert_eq!(st.naive_layer_evals, 8 * (1 + 7 * 8 / 2) * 2);
    assert!(ratio <= 0.55, "ratio {ratio}");
}

#[test]
fn resume_continues_to_the_same_result() {
    let m = model(None);
    let full = search(&m, &SearchOptions { target: Target::Keep { num: 1, den: 4 }, blocks: 1 }, None);
    let partial = search(&m, &SearchOptions { target: Target::Flips(2), blocks: 1 }, None);
    assert_eq!(partial.removal_order, full.removal_order[..2]);
    let resumed = search(&m, &SearchOptions { target: Target::Keep { num: 1, den: 4 }, blocks: 1 }, Some(partial));
    assert_eq!(resumed.removal_order, full.removal_order);
    assert_eq!(resumed.steps, full.steps);
    assert_eq!(resumed.pattern, full.pattern);
    assert_eq!(IndexSchedule::from_pattern(&full.pattern, 8).unwrap().num_full(), 2);
}

#[test]
fn pipeline_blocks_keep_each_block_head_full() {
    let m = model(None);
    let st = search(&m, &SearchOptions { target: Target::Keep { num: 1, den: 4 }, blocks: 2 }, None);
    let s = IndexSchedule::from_pattern(&st.pattern, 8).unwrap();
    assert!(s.is_full(0) && s.is_full(4), "{}", st.pattern);
    assert_eq!(s.num_full(), 2);
    // Two flips per step until the target.
    assert_eq!(st.steps.iter().filter(|s| s.step == 1).count(), 2);
    let loss = schedule_loss(&m, &s, &windows()).unwrap();
    assert_eq!(st.steps.last().unwrap().loss, loss);
}
