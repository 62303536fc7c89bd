"""The recipe's claims: python pipeline.py, the full cpu profile as README runs it (about 12-17 minutes on 2 cores),
and its report card's ordering on the test and val prompts. The slow tier: python -m pytest -m recipe."""
import json
import math

import pytest

from conftest import SHAKESPEARE, run

pytestmark = pytest.mark.recipe


@pytest.fixture(scope='module')
def cpu_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp('cpu')
    # two threads, as README's command runs: the stages run one at a time
    run(['pipeline.py', '--profile=cpu', f'--input={SHAKESPEARE}', f'--out_dir={run_dir}'], timeout=3000,
        env={'OMP_NUM_THREADS': '2'})
    return run_dir, json.loads((run_dir / 'report.json').read_text())


def test_the_recipe_each_stage_beats_the_one_before(cpu_run):
    """The recipe's claims on the cpu profile, from the report's own evaluation of every model on the same
    1,000 held-out test prompts: base < SFT < DPO, SFT < PPO (reward model, KL penalty, at a KL within a factor
    of 2 of its target), SFT < PPO-gold, the reward model above 80% of held-out pairs, and the shuffled-reward
    control no better than SFT; DPO at SFT + 2 points or more and RL with the checker at SFT + 8 or more, on test
    and val, each with McNemar p < 0.01."""
    _, card = cpu_run
    acc = {name: a['all'] for name, a in card['accuracy'].items()}
    assert card['n_test'] == 1000 and card['profile'] == 'cpu' and not card['smoke']
    assert card['tokenizer']['bytes_per_token'] > 1.5
    assert card['pretrain']['val_loss'] < 0.7 * math.log(card['tokenizer']['vocab_size'])
    assert acc['base'] < acc['SFT'] < acc['DPO'], acc
    assert acc['SFT'] < acc['PPO'] and acc['SFT'] < acc['PPO-gold'], acc
    assert 0.5 <= card['ppo']['rollout_kl'] / card['ppo']['kl_target'] <= 2, card['ppo']  # the controller holds it
    assert card['reward']['pair_accuracy'] > 0.8, card['reward']
    # the control: the same RL stage against a reward model trained on shuffled labels gains nothing (the learned
    # reward's gain comes from its signal), and that reward model is at chance on held-out pairs
    assert acc['PPO, shuffled reward'] <= acc['SFT'] + 0.01, acc
    assert card['val_accuracy']['PPO, shuffled reward']['all'] <= card['val_accuracy']['SFT']['all'] + 0.01
    assert 0.4 < card['reward_shuffled']['pair_accuracy'] < 0.6, card['reward_shuffled']
    # with margins (issue 37, step 4): DPO at least 2 points over SFT on test and val, McNemar p < 0.01 on both
    # (+ 5.9 / + 7.5 on an Intel Xeon with AMX, + 6.0 / + 5.8 on the AMD EPYC). The learned-reward row is not held to
    # this: + 4.9 / + 5.2 on that Xeon's card, but with seeds 1338 and 1339 from the same models + 1.8 and + 3.6 val
    # (docs/experiments.md, "RL with the learned reward: baselines"); another machine's floats are another draw
    assert acc['DPO'] >= acc['SFT'] + 0.02 and card['paired_vs_sft']['DPO']['p'] < 0.01, card['paired_vs_sft']
    assert (card['val_accuracy']['DPO']['all'] >= card['val_accuracy']['SFT']['all'] + 0.02
            and card['paired_vs_sft_val']['DPO']['p'] < 0.01), card['paired_vs_sft_val']
    # the paired test agrees with the ordering: more prompts fixed than broken
    for name in ('DPO', 'PPO', 'PPO-gold'):
        assert card['paired_vs_sft'][name]['fixed'] > card['paired_vs_sft'][name]['broken'], name
    # and the val prompts, where the configs were chosen, agree with the test prompts
    val = {name: a['all'] for name, a in card['val_accuracy'].items()}
    assert val['base'] < val['SFT'] < min(val['DPO'], val['PPO'], val['PPO-gold']), val
    # RL with the exact reward (the checker), GRPO (config/grpo_tasks_gold.py): SFT + 8 points or more on val,
    # where its settings were chosen, and on test, McNemar p < 0.01 on both. From the AMD EPYC (AVX-512) recipe's
    # SFT model: + 13.5 test, + 15 val (docs/experiments.md, "RL with the checker: group-relative runs").
    assert val['PPO-gold'] >= val['SFT'] + 0.08 and acc['PPO-gold'] >= acc['SFT'] + 0.08, (acc, val)
    assert card['paired_vs_sft']['PPO-gold']['p'] < 0.01 and card['paired_vs_sft_val']['PPO-gold']['p'] < 0.01
    # over-optimization: without the KL penalty PPO drifts further and its proxy score climbs past the
    # penalised run's
    assert card['ppo_nokl']['rollout_kl'] > card['ppo']['rollout_kl']
