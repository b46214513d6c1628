"""The README command lines of the 23 released OpenAI files, verbatim, and ECOSYSTEM.md section 3.3's
row for each (test data for tests/test_convert_readme_flags.py and tests/test_readme_commands.py).

Sources: openai/guided-diffusion README (MODEL_FLAGS / SAMPLE_FLAGS of every sampling example, the
128x128 classifier's DDIM example), SusungHong/Self-Attention-Guidance README (SAG_FLAGS commands for
ImageNet 128 / 256 uncond, LSUN cat / horse), openai/improved-diffusion README (MODEL_FLAGS /
DIFFUSION_FLAGS of every checkpoint, sampled with ``scripts/image_sample.py --model_path
/path/to/model.pt $MODEL_FLAGS $DIFFUSION_FLAGS``). The guided-diffusion README shows the LSUN command
for lsun_bedroom ("the other two LSUN checkpoints should work as well"); lsun_cat and lsun_horse take
the SAG README's commands, which do name them.
"""
import shlex

from checkpoints_convert.presets import PRESETS

GD_SAMPLE = "--batch_size 4 --num_samples 100 --timestep_respacing 250"
GD_LSUN_SAMPLE = "--batch_size 4 --num_samples 100 --timestep_respacing 1000"
GD_64 = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
         "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
         "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True")
GD_128 = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 --learn_sigma True "
          "--noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True "
          "--use_fp16 True --use_scale_shift_norm True")
GD_256 = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 --learn_sigma True "
          "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
          "--use_fp16 True --use_scale_shift_norm True")
GD_256_UNCOND = GD_256.replace("--class_cond True", "--class_cond False")
GD_512 = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 --learn_sigma True "
          "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
          "--use_fp16 False --use_scale_shift_norm True")
GD_64_256 = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256  --small_size 64 "
             "--learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 --num_res_blocks 2 "
             "--resblock_updown True --use_fp16 True --use_scale_shift_norm True")
GD_128_512 = ("--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 --large_size 512 --small_size 128 "
              "--learn_sigma True --noise_schedule linear --num_channels 192 --num_head_channels 64 --num_res_blocks 2 "
              "--resblock_updown True --use_fp16 True --use_scale_shift_norm True")
GD_LSUN = ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 "
           "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
           "--resblock_updown True --use_fp16 True --use_scale_shift_norm True")
GD_CLASSIFIER_128 = ("--image_size 128 --classifier_attention_resolutions 32,16,8 --classifier_depth 2 "
                     "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
                     "--classifier_use_scale_shift_norm True --classifier_scale 1.0 --classifier_use_fp16 True")
SAG_128 = ("--guide_scale 1.1 --guide_start 250 --sel_attn_block output --sel_attn_depth 8 --blur_sigma 3 "
           "--classifier_guidance True")
SAG_256 = ("--guide_scale 1.5 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 "
           "--classifier_guidance False")
SAG_CAT = SAG_256.replace("1.5", "1.05")
SAG_HORSE = SAG_256.replace("1.5", "1.01")
SAG_SAMPLE = "--batch_size 16 --num_samples 10000 --timestep_respacing 250"
ID_IMAGENET64 = "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True"
ID_CIFAR = "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3"
ID_COSINE = "--diffusion_steps 4000 --noise_schedule cosine"
ID_IMAGENET64_COND = ("--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond True",
                      "--diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False --rescale_timesteps False")
ID_UPSAMPLE = ("--num_channels 192 --num_res_blocks 2 --learn_sigma True --class_cond True",
               "--diffusion_steps 4000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False")
ID_LSUN = ("--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
           "--use_scale_shift_norm False --attention_resolutions 16")
ID_LSUN_DIFFUSION = "--diffusion_steps 1000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False"


def _id(model_flags, diffusion_flags):
    return f"python scripts/image_sample.py --model_path /path/to/model.pt {model_flags} {diffusion_flags}"


# preset -> the README command that samples it (the script name is dropped when parsing).
COMMANDS = {
    "64x64_diffusion": f"python classifier_sample.py {GD_64} --classifier_scale 1.0 --classifier_path "
                       f"models/64x64_classifier.pt --classifier_depth 4 --model_path models/64x64_diffusion.pt {GD_SAMPLE}",
    "128x128_diffusion": f"mpiexec -n 8 python classifier_sample.py {SAG_128} {GD_128} --classifier_scale 0.5 "
                         f"--classifier_path models/128x128_classifier.pt --model_path models/128x128_diffusion.pt {SAG_SAMPLE}",
    "256x256_diffusion": f"python classifier_sample.py {GD_256} --classifier_scale 1.0 --classifier_path "
                         f"models/256x256_classifier.pt --model_path models/256x256_diffusion.pt {GD_SAMPLE}",
    "256x256_diffusion_uncond": f"mpiexec -n 8 python classifier_sample.py {SAG_256} {GD_256_UNCOND} --classifier_scale "
                                f"0.0 --classifier_path models/256x256_classifier.pt --model_path "
                                f"models/256x256_diffusion.pt {SAG_SAMPLE}",
    "512x512_diffusion": f"python classifier_sample.py {GD_512} --classifier_scale 4.0 --classifier_path "
                         f"models/512x512_classifier.pt --model_path models/512x512_diffusion.pt {GD_SAMPLE}",
    "64_256_upsampler": f"python super_res_sample.py {GD_64_256} --model_path models/64_256_upsampler.pt "
                        f"--base_samples 64_samples.npz {GD_SAMPLE}",
    "128_512_upsampler": f"python super_res_sample.py {GD_128_512} --model_path models/128_512_upsampler.pt {GD_SAMPLE} "
                         "--base_samples 128_samples.npz",
    "lsun_bedroom": f"python image_sample.py {GD_LSUN} --model_path models/lsun_bedroom.pt {GD_LSUN_SAMPLE}",
    "lsun_cat": f"mpiexec -n 8 python image_sample.py {SAG_CAT} {GD_LSUN} --model_path models/lsun_cat.pt {SAG_SAMPLE}",
    "lsun_horse": f"mpiexec -n 8 python image_sample.py {SAG_HORSE} {GD_LSUN} --model_path models/lsun_horse.pt {SAG_SAMPLE}",
    "lsun_horse_nodropout": f"python image_sample.py {GD_LSUN.replace('--dropout 0.1', '--dropout 0.0')} --model_path "
                            f"models/lsun_horse_nodropout.pt {GD_LSUN_SAMPLE}",
    "64x64_classifier": f"python classifier_sample.py {GD_64} --classifier_scale 1.0 --classifier_path "
                        f"models/64x64_classifier.pt --classifier_depth 4 --model_path models/64x64_diffusion.pt {GD_SAMPLE}",
    "128x128_classifier": "mpiexec -n N python scripts/classifier_sample.py --model_path /path/to/model.pt --classifier_path "
                          f"path/to/classifier.pt {GD_128.replace('--diffusion_steps 1000 ', '').replace('--noise_schedule linear ', '')} "
                          f"{GD_CLASSIFIER_128} --batch_size 4 --num_samples 50000 --timestep_respacing ddim25 --use_ddim True",
    "256x256_classifier": f"python classifier_sample.py {GD_256} --classifier_scale 1.0 --classifier_path "
                          f"models/256x256_classifier.pt --model_path models/256x256_diffusion.pt {GD_SAMPLE}",
    "512x512_classifier": f"python classifier_sample.py {GD_512} --classifier_scale 4.0 --classifier_path "
                          f"models/512x512_classifier.pt --model_path models/512x512_diffusion.pt {GD_SAMPLE}",
    "imagenet64_uncond_100M_1500K": _id(ID_IMAGENET64, ID_COSINE),
    "imagenet64_uncond_vlb_100M_1500K": _id(ID_IMAGENET64, ID_COSINE + " --use_kl True"),
    "cifar10_uncond_50M_500K": _id(ID_CIFAR, ID_COSINE),
    "cifar10_uncond_vlb_50M_500K": _id(ID_CIFAR, ID_COSINE + " --use_kl True"),
    "imagenet64_cond_270M_250K": _id(*ID_IMAGENET64_COND),
    "upsample_cond_500K": "python scripts/super_res_sample.py --model_path /path/to/model.pt "
                          f"{ID_UPSAMPLE[0]} {ID_UPSAMPLE[1]}",
    "lsun_uncond_100M_1200K_bs128": _id(ID_LSUN, ID_LSUN_DIFFUSION),
    "lsun_uncond_100M_2400K_bs64": _id(ID_LSUN, ID_LSUN_DIFFUSION + " --use_scale_shift_norm False"),
}

# ECOSYSTEM.md section 3.3, one row per file: (image size, class_cond, channels, res blocks, attention
# px, num_heads, num_head_channels, new order, scale-shift, resblock_updown, schedule, T,
# rescale_timesteps, rescale_learned_sigmas, params). All learn sigma (6 output channels, learned range).
ECOSYSTEM = {
    "64x64_diffusion": (64, True, 192, 3, (32, 16, 8), 4, 64, True, True, True, "cosine", 1000, False, False, 295_904_454),
    "128x128_diffusion": (128, True, 256, 2, (32, 16, 8), 4, -1, False, True, True, "linear", 1000, False, False, 421_529_606),
    "256x256_diffusion": (256, True, 256, 2, (32, 16, 8), 4, 64, False, True, True, "linear", 1000, False, False, 553_838_086),
    "256x256_diffusion_uncond": (256, False, 256, 2, (32, 16, 8), 4, 64, False, True, True, "linear", 1000, False, False,
                                 552_814_086),
    "512x512_diffusion": (512, True, 256, 2, (32, 16, 8), 4, 64, False, True, True, "linear", 1000, False, False, 558_997_638),
    "64_256_upsampler": (256, True, 192, 2, (32, 16, 8), 4, -1, False, True, True, "linear", 1000, False, False, 311_795_910),
    "128_512_upsampler": (512, True, 192, 2, (32, 16), 4, 64, False, True, True, "linear", 1000, False, False, 308_835_270),
    "imagenet64_uncond_100M_1500K": (64, False, 128, 3, (16, 8), 4, -1, False, True, False, "cosine", 4000, True, True,
                                     121_063_942),
    "cifar10_uncond_50M_500K": (32, False, 128, 3, (16, 8), 4, -1, False, True, False, "cosine", 4000, True, True, 52_546_438),
    "imagenet64_cond_270M_250K": (64, True, 192, 3, (16, 8), 4, -1, False, True, False, "cosine", 4000, False, False,
                                  273_049_350),
    "upsample_cond_500K": (256, True, 192, 2, (16, 8), 4, -1, False, True, False, "linear", 4000, False, False, 279_792_390),
    "lsun_uncond_100M_1200K_bs128": (256, False, 128, 2, (16,), 1, -1, False, False, False, "linear", 1000, False, False,
                                     113_676_678),
}
for _name in ("lsun_bedroom", "lsun_cat", "lsun_horse", "lsun_horse_nodropout"):
    ECOSYSTEM[_name] = ECOSYSTEM["256x256_diffusion_uncond"]
ECOSYSTEM["imagenet64_uncond_vlb_100M_1500K"] = ECOSYSTEM["imagenet64_uncond_100M_1500K"]
ECOSYSTEM["cifar10_uncond_vlb_50M_500K"] = ECOSYSTEM["cifar10_uncond_50M_500K"]
ECOSYSTEM["lsun_uncond_100M_2400K_bs64"] = ECOSYSTEM["lsun_uncond_100M_1200K_bs128"]
# classifiers: (image size, depth); width 128, attention 32,16,8, attention pool, scale-shift, resblock_updown
CLASSIFIERS = {"64x64_classifier": (64, 4), "128x128_classifier": (128, 2), "256x256_classifier": (256, 2),
               "512x512_classifier": (512, 2)}
DIFFUSION_NAMES = [n for n in PRESETS if n not in CLASSIFIERS]

# Sampling-script flags that name files or counts, not the network or the process.
_NOT_LOADER = {"model_path", "classifier_path", "base_samples", "batch_size", "num_samples"}


def command_flags(command: str) -> dict:
    """'--name value' pairs of a README command (the launcher and script words dropped, last value wins)."""
    words = shlex.split(command)
    words = words[next(i for i, w in enumerate(words) if w.startswith("--")):]
    assert len(words) % 2 == 0 and all(w.startswith("--") for w in words[::2]), command
    return {name[2:]: value for name, value in zip(words[::2], words[1::2])}


def loader_flags(name: str) -> dict:
    return {k: v for k, v in command_flags(COMMANDS[name]).items() if k not in _NOT_LOADER}


def model_path(name: str) -> str:
    flags = command_flags(COMMANDS[name])
    return flags["classifier_path"] if name in CLASSIFIERS else flags["model_path"]


